#!/usr/bin/env python3
"""Check a parallel layout before torchrun starts and print a per-GPU memory estimate.

    python3 launch/plan.py --model olmoe [--config CONFIG_JSON] --world 8 --tp 1 --pp 1 --ep 8 \
        --seq 4096 --micro-batch 1 --global-batch 128 --k-a 4 [--recompute]

Exit 1 with one line naming the offending variable (TP, PP, EP, GPUS_PER_NODE x NNODES,
GLOBAL_BATCH, MICRO_BATCH) when the layout does not divide. Standard library only (no torch import),
so it runs in milliseconds on the launch node.

The estimate (GiB, per GPU, bf16 weights, fp32 main grads, distributed optimizer with fp32 master
weights and Adam moments sharded over the data-parallel group) is a planning aid, not a guarantee:
activations assume flash attention (Transformer Engine), no activation recompute unless --recompute
(full, per layer), and ignore allocator fragmentation and communication buffers.
"""

import argparse
import json
import os
import sys

# Paper models (DESIGN.md §2, §3): HF config fields used here.
PRESETS = {
    "olmoe": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                  num_experts=64, num_experts_per_tok=8, intermediate_size=1024, vocab_size=50304, head_dim=128),
    "phimoe": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   num_local_experts=16, num_experts_per_tok=2, intermediate_size=6400, vocab_size=32064,
                   head_dim=128),
}
GiB = 1024 ** 3


def fail(msg):
    print(f"launch: error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_config(model, path):
    cfg = dict(PRESETS[model])
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
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(PRESETS), required=True)
    ap.add_argument("--config", default=None)
    for k in ("world", "tp", "pp", "ep", "seq", "micro-batch", "global-batch", "k-a"):
        ap.add_argument(f"--{k}", type=int, required=True)
    ap.add_argument("--recompute", action="store_true")
    a = ap.parse_args()
    c = load_config(a.model, a.config)
    d, L, E, k = c["hidden_size"], c["num_hidden_layers"], c["num_experts"], c["num_experts_per_tok"]
    heads, kv, hd, ffn, V = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"], c["vocab_size"]

    for name, v in (("TP", a.tp), ("PP", a.pp), ("EP", a.ep), ("MICRO_BATCH", a.micro_batch), ("GLOBAL_BATCH", a.global_batch)):
        if v < 1:
            fail(f"{name}={v} must be >= 1")
    if a.world % (a.tp * a.pp):
        fail(f"TP={a.tp} x PP={a.pp} does not divide the world size GPUS_PER_NODE x NNODES = {a.world}")
    dp = a.world // (a.tp * a.pp)
    if E % a.ep:
        fail(f"EP={a.ep} does not divide the number of experts ({E})")
    if (a.tp * dp) % a.ep:
        fail(f"EP={a.ep} must divide TP x DP = {a.tp * dp} (world {a.world} / PP {a.pp})")
    if heads % a.tp or kv % a.tp:
        fail(f"TP={a.tp} must divide the attention heads ({heads}) and KV heads ({kv})")
    if L % a.pp:
        fail(f"PP={a.pp} does not divide the number of layers ({L})")
    if a.global_batch % (a.micro_batch * dp):
        fail(f"GLOBAL_BATCH={a.global_batch} is not divisible by MICRO_BATCH={a.micro_batch} x DP={dp}")
    if a.seq % a.tp:
        fail(f"SEQ_LENGTH={a.seq} must be divisible by TP={a.tp} (sequence parallel)")
    if not 0 <= a.k_a < k:
        fail(f"N_CE={a.k_a} must be in [0, top-k={k})")

    # Parameters held by one GPU.
    attn = d * (heads + 2 * kv) * hd + heads * hd * d
    ce = E * (2 * d + ffn) if a.k_a else 0
    dense_layer = attn / a.tp + d * E + ce + 4 * d
    expert_layer = E * 3 * d * ffn / (a.ep * a.tp)  # expert-TP = TP
    layers = L // a.pp
    emb = V * d / a.tp * (2 if a.pp == 1 else 1)
    dense = layers * dense_layer + emb
    experts = layers * expert_layer
    expert_dp = a.tp * dp // (a.ep * a.tp)
    weights = 2 * (dense + experts)
    grads = 4 * (dense + experts)
    optim = 12 * (dense / dp + experts / max(1, expert_dp))
    # Activations (bf16) of the micro-batches in flight: 1F1B keeps up to PP of them on stage 0.
    tokens = a.seq * a.micro_batch / a.tp
    k_m = k - a.k_a
    per_layer = tokens * (34 * d + k_m * (3 * ffn * 2 + 2 * d))
    in_flight = min(a.pp, a.global_batch // (a.micro_batch * dp))
    act = (tokens * d * 2 * layers if a.recompute else per_layer * layers) * in_flight
    logits = a.seq * a.micro_batch * V / a.tp * 4 * 2
    total = weights + grads + optim + act + logits
    print(f"layout: world {a.world} = TP {a.tp} x PP {a.pp} x DP {dp}; EP {a.ep} "
          f"({E // a.ep} experts per GPU, expert-DP {expert_dp}); {a.global_batch // (a.micro_batch * dp)} "
          f"micro-batches per step")
    print(f"memory per GPU (estimate, GiB): weights {weights / GiB:.1f} + grads {grads / GiB:.1f} + "
          f"optimizer {optim / GiB:.1f} + activations {act / GiB:.1f}{' (recompute)' if a.recompute else ''} "
          f"+ logits {logits / GiB:.1f} = {total / GiB:.1f}")
    if total > 78 * GiB:
        print(f"launch: warning: {total / GiB:.0f} GiB may not fit an 80 GB GPU: raise EP/TP/PP or NNODES, "
              "or set RECOMPUTE=1", file=sys.stderr)


if __name__ == "__main__":
    main()
