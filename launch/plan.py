#!/usr/bin/env python3
"""Check a parallel layout before torchrun starts; print a per-GPU memory estimate term by term, the
checkpoint size and save time, and layout advice.

    python3 launch/plan.py --model phimoe [--config CONFIG_JSON] --world 32 --gpus-per-node 8 \
        --tp 1 --pp 4 --ep 8 --seq 4096 --micro-batch 1 --global-batch 128 --k-a 1 [--recompute] \
        [--transformer-impl transformer_engine] [--gpu-mem-gib 80] [--ckpt-write-gbps 2] \
        [--shutdown-timeout 300 --torchrun-shutdown-flag 1] [--signal-lead 600] [--dist-timeout-minutes 10]

Exit 1 with one line naming the offending variable (TP, PP, EP, GPUS_PER_NODE x NNODES,
GLOBAL_BATCH, MICRO_BATCH, N_CE) when the layout does not divide. Warnings (stderr) when the estimate
exceeds 0.85 x GPU_MEM_GIB or a save cannot finish within the SIGTERM grace. Standard library only
(no torch import), so it runs in milliseconds on the launch node.

The estimate is a planning aid, not a guarantee: it assumes tokens spread evenly over the experts (SFT
runs without the load-balancing loss, so the busiest GPU can receive more) and megatron-core's 1F1B
schedule (not interleaved).
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, replace

# The package from this checkout, whatever the launch node's Python has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_ce.models import registry  # noqa: E402  (standard library only, like this script)

# Paper models (docs/METHOD.md §2, §3), each family's launch preset: the HF config fields used here and
# `qk_norm` (OLMoE's full-width QK norms keep their inputs for the backward).
PRESETS = {mt: registry.presets(mt).launch for mt in registry.builtin_model_types()}
GiB = 1024 ** 3
GB = 1e9
WARN_FRACTION = 0.85  # headroom for what the estimate leaves out (routing imbalance, kernels' scratch)
TORCHRUN_FIXED_GRACE_S = 30  # torchrun without --shutdown-timeout SIGKILLs the ranks 30 s after SIGTERM

# Per-GPU fixed costs outside the parameter/activation terms (measured orders of magnitude, not exact):
CUDA_CONTEXT = 1.0 * GiB      # CUDA context + loaded kernels (cuBLAS, cuDNN, TE): 0.5-1 GiB per process
NCCL_PER_COMM = 0.5 * GiB     # NCCL buffers of one communicator: up to 32 channels x ~9 MiB (SIMPLE 4 MiB +
                              # LL128 ~4.6 MiB + LL) per ring/tree peer, plus p2p buffers for all-to-all
TE_WORKSPACE = 0.25 * GiB     # cuBLASLt workspace (32 MiB per stream on Hopper) x the grouped-GEMM streams,
                              # cuDNN fused-attention workspace
FRAGMENTATION = 0.10          # PyTorch caching allocator: ~10% of what it holds is lost to fragmentation


def fail(msg):
    print(f"launch: error: {msg}", file=sys.stderr)
    sys.exit(1)


def warn(msg):
    print(f"launch: warning: {msg}", file=sys.stderr)


def load_config(model, path):
    preset = PRESETS[model]
    cfg = dict(preset)
    if path:
        if os.path.isdir(path):
            for name in ("megatron_ce.json", "config.json"):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
        if not os.path.isfile(path):
            fail(f"MODEL_CONFIG={path}: no such file")
        with open(path) as f:
            data = json.load(f)
        cfg.update(data.get("hf_config", data))  # megatron_ce.json wraps the HF config
    cfg["num_experts"] = cfg.get("num_experts") or cfg.get("num_local_experts")
    cfg["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["qk_norm"] = preset["qk_norm"]  # a property of the family, not of a config file
    return cfg


@dataclass(frozen=True)
class Layout:
    world: int
    gpus_per_node: int
    tp: int
    pp: int
    ep: int
    recompute: bool

    @property
    def dp(self):
        return self.world // (self.tp * self.pp)

    @property
    def expert_dp(self):  # expert-TP = TP (the trainer's default): world = ETP x EP x expert-DP x PP
        return self.world // (self.tp * self.ep * self.pp)


@dataclass(frozen=True)
class Run:
    seq: int
    micro_batch: int
    global_batch: int
    k_a: int
    ce_variant: str
    te: bool  # Transformer Engine: fused (flash) attention, its workspaces; local impl: unfused softmax


def layout_error(c, lay: Layout, run: Run):
    """One line naming the variable that does not divide, or None."""
    E, k, L = c["num_experts"], c["num_experts_per_tok"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    for name, v in (("TP", lay.tp), ("PP", lay.pp), ("EP", lay.ep), ("MICRO_BATCH", run.micro_batch),
                    ("GLOBAL_BATCH", run.global_batch)):
        if v < 1:
            return f"{name}={v} must be >= 1"
    if lay.world % (lay.tp * lay.pp):
        return f"TP={lay.tp} x PP={lay.pp} does not divide the world size GPUS_PER_NODE x NNODES = {lay.world}"
    if E % lay.ep:
        return f"EP={lay.ep} does not divide the number of experts ({E})"
    if lay.dp % lay.ep:
        return (f"EP={lay.ep} must divide DP = {lay.dp} (world {lay.world} / (TP {lay.tp} x PP {lay.pp}); "
                "expert-TP = TP)")
    if heads % lay.tp or kv % lay.tp:
        return f"TP={lay.tp} must divide the attention heads ({heads}) and KV heads ({kv})"
    if L % lay.pp:
        return f"PP={lay.pp} does not divide the number of layers ({L})"
    if run.global_batch % (run.micro_batch * lay.dp):
        return f"GLOBAL_BATCH={run.global_batch} is not divisible by MICRO_BATCH={run.micro_batch} x DP={lay.dp}"
    if run.seq % lay.tp:
        return f"SEQ_LENGTH={run.seq} must be divisible by TP={lay.tp} (sequence parallel)"
    if not 0 <= run.k_a < k:
        return f"N_CE={run.k_a} must be in [0, top-k={k})"
    return None


def param_counts(c, k_a):
    """Whole-model parameter counts: per-layer dense, per-layer expert, embedding, output layer."""
    d, E, ffn, hd = c["hidden_size"], c["num_experts"], c["intermediate_size"], c["head_dim"]
    heads, kv, V = c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    attn = d * (heads + 2 * kv) * hd + heads * hd * d
    if c.get("attention_bias"):
        attn += (heads + 2 * kv) * hd + d
    ce = E * (2 * d + ffn) if k_a else 0  # theta gate/up (d each) and down (ffn) per expert, replicated
    norms = 4 * d  # two norms (RMSNorm weight; OLMoE's full-width QK norms or Phi-MoE's LayerNorm biases)
    dense_layer = attn + d * E + ce + norms
    expert_layer = E * 3 * d * ffn  # SwiGLU: gate, up, down
    emb = V * d
    out = 0 if c.get("tie_word_embeddings") else V * d + (V if c.get("lm_head_bias") else 0)
    total = c["num_hidden_layers"] * (dense_layer + expert_layer) + emb + out + d
    return dict(dense_layer=dense_layer, expert_layer=expert_layer, emb=emb, out=out, total=total)


def layer_activations(c, lay: Layout, run: Run):
    """Bytes one transformer layer keeps for its backward, per micro-batch, without recompute (bf16).

    Megatron's accounting (Korthikanti et al. 2022, "Reducing Activation Recomputation"): with sequence
    parallelism every tensor outside the TP-split GEMMs is sharded over TP too, so the attention block is
    (tokens / TP) x its per-token bytes; without flash attention the softmax output [heads/TP, s, s] is
    kept as well (their 5as^2b term; dropout is 0 here, so only the 2-byte softmax output remains)."""
    d, ffn, hd, E = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["num_experts"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    tokens = run.seq * run.micro_batch
    k_m = c["num_experts_per_tok"] - run.k_a
    # Attention: norm input, QKV GEMM input, Q/K/V, core-attention output (= out-proj input), fp32 LSE.
    attn = 2 * d + 2 * d + 2 * (heads + 2 * kv) * hd + 2 * heads * hd + 4 * heads
    if c["qk_norm"]:
        attn += 2 * (heads + kv) * hd  # OLMoE's full-width QK norms keep their inputs
    if not run.te:
        attn += 2 * heads * run.seq
    # MoE block before dispatch: norm input and output, fp32 router logits and probs.
    pre = 2 * d + 2 * d + 8 * E
    if run.k_a and run.ce_variant == "hidden":
        pre += 2 * d + 2 * d  # h * theta-mix before dispatch: the mix and the scaled copy
    dense = tokens / lay.tp * (attn + pre)
    # Experts, per routed copy (k_m per token). Expert-TP = TP: the dispatcher gathers the TP group's
    # tokens, so d-sized tensors are not divided by TP, ffn-sized ones are. Without CE (megatron-core's
    # grouped MLP): expert input (d), fc1 output (2 ffn), probs-weighted SwiGLU output (ffn). With CE
    # (three-vector variant, megatron_ce/ce/experts.py): input, c_gate, c_up, x*c_gate, x*c_up (5 d) and
    # gate, up, silu(gate), silu*up, c_down*p, fc2 input (6 ffn).
    n_d, n_f = (5, 6) if run.k_a and run.ce_variant == "ia3" else (1, 3)
    experts = tokens * k_m * 2 * (n_d * d + n_f * ffn / lay.tp)
    return dense + experts


def dispatch_buffers(c, run: Run):
    """MoE all-to-all working set of one layer (transient): permute output, all-to-all receive buffer and
    the sort-by-expert copy, k_m bf16 copies of each token (the same three again on the way back, after
    these are freed)."""
    k_m = c["num_experts_per_tok"] - run.k_a
    return 3 * run.seq * run.micro_batch * k_m * 2 * c["hidden_size"]


def communicators(lay: Layout):
    """NCCL communicators that carry traffic on one GPU (TP, PP, DP for dense grads, EP for the
    all-to-all, expert-DP for expert grads): those with more than one rank."""
    return sum(1 for n in (lay.tp, lay.pp, lay.dp, lay.ep, lay.expert_dp) if n > 1)


def stage_memory(c, lay: Layout, run: Run, first: bool, last: bool):
    """{term: bytes} of one pipeline stage's GPU."""
    p = param_counts(c, run.k_a)
    layers = c["num_hidden_layers"] // lay.pp
    # Parameters on this GPU: dense ones split over TP, experts over EP x expert-TP.
    dense = layers * p["dense_layer"] / lay.tp + (p["emb"] / lay.tp if first else 0) + (p["out"] / lay.tp if last else 0)
    expert = layers * p["expert_layer"] / (lay.ep * lay.tp)
    n_micro = run.global_batch // (run.micro_batch * lay.dp)
    # 1F1B: stage i keeps PP - i micro-batches' activations alive (stage 0 the most, the last stage 1).
    in_flight = min(lay.pp, n_micro) if first else 1
    per_layer = layer_activations(c, lay, run)
    if lay.recompute:
        # Full recompute, one layer per checkpoint: only each layer's input [s/TP, b, d] is kept.
        act = in_flight * layers * run.seq * run.micro_batch / lay.tp * 2 * c["hidden_size"]
    else:
        act = in_flight * layers * per_layer
    t = dict(
        # bf16 weights (the distributed optimizer's param buffer is the model itself).
        weights=2 * (dense + expert),
        # fp32 main grads, full size on every GPU (megatron_ce/training/loop.py: grad_reduce_in_fp32=True;
        # the distributed optimizer reduce-scatters out of this buffer, it does not shard it).
        grads=4 * (dense + expert),
        # Distributed optimizer: fp32 master weights + Adam m and v (12 B/param), sharded over DP for
        # dense params and over expert-DP for expert params.
        optimizer=12 * (dense / lay.dp + expert / lay.expert_dp),
        activations=act,
        # Backward of one layer holds gradients about the size of its activations; with recompute the
        # layer being recomputed holds its full activations too; plus the MoE dispatch buffers.
        working=per_layer * (2 if lay.recompute else 1) + dispatch_buffers(c, run),
        # Last stage: bf16 logits, their fp32 copy and the fp32 softmax the vocab-parallel cross entropy
        # keeps for backward: [s, b, vocab/TP] x (2 + 4 + 4) bytes.
        logits=(run.seq * run.micro_batch * c["vocab_size"] / lay.tp * 10) if last else 0,
    )
    t["fragmentation"] = FRAGMENTATION * sum(t.values())
    t["cuda_context"] = CUDA_CONTEXT
    t["nccl"] = NCCL_PER_COMM * communicators(lay)
    t["te_workspace"] = TE_WORKSPACE if run.te else 0
    info = dict(dense_params=dense, expert_params=expert, layers=layers, in_flight=in_flight,
                per_layer=per_layer, n_micro=n_micro, first=first, last=last)
    return t, info


def peak_stage(c, lay: Layout, run: Run):
    """(terms, info) of the pipeline stage that needs the most memory."""
    stages = [(True, True)] if lay.pp == 1 else [(True, False), (False, True)]
    return max((stage_memory(c, lay, run, f, l) for f, l in stages), key=lambda s: sum(s[0].values()))


def ep_crosses_nodes(lay: Layout):
    # megatron-core orders expert ranks tp-ep-dp-pp: one EP group spans ETP x EP consecutive ranks.
    return lay.ep * lay.tp > lay.gpus_per_node


def time_factor(lay: Layout, run: Run):
    """Rough relative step time, to rank layouts that fit: pipeline bubble (PP-1)/micro-batches, full
    recompute +1/3 (one more forward), ~10% per TP doubling (exposed sequence-parallel collectives)."""
    n_micro = run.global_batch // (run.micro_batch * lay.dp)
    f = 1 + (lay.pp - 1) / n_micro
    f *= 4 / 3 if lay.recompute else 1
    return f * 1.1 ** math.log2(lay.tp)


def suggest(c, lay: Layout, run: Run, limit):
    """The fastest layout (by time_factor) on the same GPUs that keeps EP within a node and fits."""
    best = None
    tps = [t for t in (1, 2, 4, 8) if t <= lay.gpus_per_node]
    for tp in tps:
        for pp in range(1, c["num_hidden_layers"] + 1):
            for ep in range(1, c["num_experts"] + 1):
                for rec in (False, True):
                    cand = replace(lay, tp=tp, pp=pp, ep=ep, recompute=rec)
                    if ep_crosses_nodes(cand) or layout_error(c, cand, run):
                        continue
                    total = sum(peak_stage(c, cand, run)[0].values())
                    if total > limit:
                        continue
                    key = (time_factor(cand, run), tp, -ep)
                    if best is None or key < best[0]:
                        best = (key, cand, total)
    return best


def checkpoint_report(p, a):
    """Size of one save (whole model, all ranks) and the time it takes, against the SIGTERM grace and
    the collective timeout."""
    weights = 2 * p["total"]      # bf16 weights (megatron-core dist checkpoint)
    optim = 12 * p["total"]       # per-rank files: fp32 master weights + Adam m, v
    size = weights + optim
    secs = size / (a.ckpt_write_gbps * GB)
    keep = (f"KEEP_CHECKPOINTS={a.keep_checkpoints} -> up to {(a.keep_checkpoints + 1) * size / GB:.0f} GB on disk "
            "during a save" if a.keep_checkpoints else "every checkpoint is kept")
    print(f"checkpoint: {p['total'] / 1e9:.2f}B params -> {weights / GB:.1f} GB weights (bf16) + {optim / GB:.1f} GB "
          f"optimizer (fp32 master + Adam m, v) = {size / GB:.1f} GB per save; ~{secs:.0f} s at "
          f"CKPT_WRITE_GBPS={a.ckpt_write_gbps:g} (aggregate); {keep}")
    grace, why = sigterm_grace(a)
    if grace is not None:
        print(f"checkpoint: after SIGTERM the ranks finish the iteration and save within {grace:.0f} s ({why})")
        if secs > grace:
            warn(f"a save takes ~{secs:.0f} s at CKPT_WRITE_GBPS={a.ckpt_write_gbps:g} but the ranks get {grace:.0f} s "
                 f"after SIGTERM ({why}): raise SHUTDOWN_TIMEOUT and the SLURM --signal=TERM@ lead "
                 "(SIGTERM_LEAD), or set CKPT_WRITE_GBPS to the file system's measured bandwidth")
    if a.dist_timeout_minutes and secs > 60 * a.dist_timeout_minutes:
        warn(f"a save takes ~{secs:.0f} s, longer than DIST_TIMEOUT_MINUTES={a.dist_timeout_minutes:g}: ranks that "
             "finish writing first time out waiting for the slowest at the post-save barrier; raise it")


def sigterm_grace(a):
    """Seconds the ranks have between SIGTERM and SIGKILL, and what sets it."""
    limits = []
    if a.shutdown_timeout is not None:
        if a.torchrun_shutdown_flag:
            limits.append((a.shutdown_timeout, f"torchrun --shutdown-timeout {a.shutdown_timeout:g}"))
        else:
            limits.append((TORCHRUN_FIXED_GRACE_S, "this torchrun has no --shutdown-timeout: it SIGKILLs the "
                                                   f"ranks {TORCHRUN_FIXED_GRACE_S} s after its own SIGTERM"))
    if a.signal_lead:
        limits.append((a.signal_lead, f"SLURM --signal=TERM@{a.signal_lead:g}"))
    if not limits:
        return None, ""
    return min(limits)[0], "; ".join(w for _, w in limits)


def print_memory(lay, run, terms, info, gpu_mem, limit):
    n_micro = info["n_micro"]
    stage = "the only stage" if lay.pp == 1 else ("stage 0" if info["first"] else f"stage {lay.pp - 1} (last)")
    attn = "flash attention" if run.te else "unfused attention (softmax [s, s] kept)"
    print(f"memory per GPU (estimate, GiB): {stage}, {info['in_flight']} of {n_micro} micro-batches in flight, "
          f"{attn}, {'full recompute' if lay.recompute else 'no recompute'}")
    rows = [
        ("weights", "bf16, {:.2f}B params here ({:.2f}B dense + {:.2f}B expert)".format(
            (info["dense_params"] + info["expert_params"]) / 1e9, info["dense_params"] / 1e9, info["expert_params"] / 1e9)),
        ("grads", "fp32 main grads, full size (grad_reduce_in_fp32)"),
        ("optimizer", f"fp32 master + Adam m, v; dense over DP {lay.dp}, experts over expert-DP {lay.expert_dp}"),
        ("activations", (f"{info['layers']} layer inputs x {info['in_flight']} micro-batches (recompute)" if lay.recompute else
                         f"{info['layers']} layers x {info['in_flight']} micro-batches x {info['per_layer'] / GiB:.2f}")),
        ("working", "one layer's backward" + (" + the recomputed layer" if lay.recompute else "") + " + MoE dispatch buffers"),
        ("logits", "bf16 + fp32 logits + fp32 softmax [s, b, vocab/TP] (last stage)"),
        ("fragmentation", f"{FRAGMENTATION:.0%} of the above (caching allocator)"),
        ("cuda_context", "CUDA context and kernels"),
        ("nccl", f"{communicators(lay)} communicators x {NCCL_PER_COMM / GiB:g}"),
        ("te_workspace", "Transformer Engine / cuBLASLt workspaces"),
    ]
    for name, why in rows:
        print(f"  {name:<14}{terms[name] / GiB:7.1f}  {why}")
    total = sum(terms.values())
    print(f"  {'total':<14}{total / GiB:7.1f}  of GPU_MEM_GIB={gpu_mem:g} (warning above {limit / GiB:.1f})")
    return total


# plan.py's flags as the launch scripts' variables, for one-line errors that name what the user set.
ENV_NAMES = {"--ce-variant": "CE_VARIANT", "--transformer-impl": "TRANSFORMER_IMPL", "--gpu-mem-gib": "GPU_MEM_GIB",
             "--ckpt-write-gbps": "CKPT_WRITE_GBPS", "--dist-timeout-minutes": "DIST_TIMEOUT_MINUTES",
             "--shutdown-timeout": "SHUTDOWN_TIMEOUT", "--signal-lead": "SIGTERM_LEAD",
             "--keep-checkpoints": "KEEP_CHECKPOINTS"}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        for flag, env in ENV_NAMES.items():
            message = message.replace(f"argument {flag}", env)
        fail(message)


def main():
    ap = Parser()
    ap.add_argument("--model", choices=sorted(PRESETS), required=True)
    ap.add_argument("--config", default=None)
    for k in ("world", "tp", "pp", "ep", "seq", "micro-batch", "global-batch", "k-a"):
        ap.add_argument(f"--{k}", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: --world (one node)")
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--ce-variant", choices=("ia3", "hidden"), default="ia3")
    ap.add_argument("--transformer-impl", choices=("transformer_engine", "local"), default="transformer_engine")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--ckpt-write-gbps", type=float, default=2.0)
    ap.add_argument("--keep-checkpoints", type=int, default=0)
    ap.add_argument("--shutdown-timeout", type=float, default=None)
    ap.add_argument("--torchrun-shutdown-flag", type=int, choices=(0, 1), default=1)
    ap.add_argument("--signal-lead", type=float, default=0.0)
    ap.add_argument("--dist-timeout-minutes", type=float, default=None)
    a = ap.parse_args()
    if a.gpu_mem_gib <= 0 or a.ckpt_write_gbps <= 0:
        fail(f"GPU_MEM_GIB={a.gpu_mem_gib:g} and CKPT_WRITE_GBPS={a.ckpt_write_gbps:g} must be > 0")
    c = load_config(a.model, a.config)
    lay = Layout(a.world, a.gpus_per_node or a.world, a.tp, a.pp, a.ep, a.recompute)
    run = Run(a.seq, a.micro_batch, a.global_batch, a.k_a, a.ce_variant, te=a.transformer_impl == "transformer_engine")
    err = layout_error(c, lay, run)
    if err:
        fail(err)

    E = c["num_experts"]
    print(f"layout: world {lay.world} = TP {lay.tp} x PP {lay.pp} x DP {lay.dp}; EP {lay.ep} "
          f"({E // lay.ep} experts per GPU, expert-DP {lay.expert_dp}); "
          f"{a.global_batch // (a.micro_batch * lay.dp)} micro-batches per step")
    limit = WARN_FRACTION * a.gpu_mem_gib * GiB
    terms, info = peak_stage(c, lay, run)
    total = print_memory(lay, run, terms, info, a.gpu_mem_gib, limit)
    checkpoint_report(param_counts(c, a.k_a), a)

    crosses = ep_crosses_nodes(lay)
    if total > limit:
        warn(f"~{total / GiB:.0f} GiB per GPU exceeds {WARN_FRACTION:.0%} of GPU_MEM_GIB={a.gpu_mem_gib:g}: raise "
             "PP/EP or NNODES, or set RECOMPUTE=1")
    if crosses:
        print(f"advice: EP={lay.ep} x TP={lay.tp} spans {lay.ep * lay.tp} GPUs > GPUS_PER_NODE={lay.gpus_per_node}: "
              "every MoE layer's all-to-all crosses the inter-node network, twice per forward and backward. Keep "
              "EP x TP <= GPUS_PER_NODE and scale with PP/DP across nodes (megatron-core's Mixtral 8x7B recipe: "
              "TP1 PP4 EP8)")
    if lay.tp > lay.gpus_per_node:
        print(f"advice: TP={lay.tp} > GPUS_PER_NODE={lay.gpus_per_node}: tensor parallelism across nodes is slow")
    if crosses or total > limit:
        best = suggest(c, lay, run, limit)
        if best:
            _, s, est = best
            print(f"advice: on these {lay.world} GPUs, e.g. TP={s.tp} PP={s.pp} EP={s.ep} RECOMPUTE={int(s.recompute)} "
                  f"(~{est / GiB:.0f} GiB per GPU, EP within a node)")
        else:
            print(f"advice: no layout with EP within a node fits {WARN_FRACTION:.0%} of {a.gpu_mem_gib:g} GiB on "
                  f"{lay.world} GPUs: add nodes")


if __name__ == "__main__":
    main()
