#!/usr/bin/env python
"""Speed of our exported HF CE modeling code (megatron_ce/hf) against the paper's reference block.

The reference (`OlmoeSparseCompressedMoeBlock` of the paper's released code) loops over the experts
with per-expert nn.Linear gate_proj / up_proj / down_proj; its expert computes
    down_proj((act(gate_proj(x * e1)) * up_proj(x * e3)) * e2)
with e1, e2, e3 the gate / down / up rows of the token's mixed CE vectors (`ces[:, 0]`,
`ces[:, 1, :ffn]`, `ces[:, 2]`), the auxiliary weights renormalised, and the main experts weighted by
their raw softmax probabilities (norm_topk_prob False). It is reimplemented below in plain torch from
that description; for Phi-MoE the same block runs on the stock sparsemixer router (first pick main,
second pick compressed). The reference model is a copy of ours with every MoE block replaced by the
reference block holding the same weights; the tool asserts both give the same logits.

Measured side by side in one process, in interleaved rounds (order alternating):
  train:        one training step (forward + backward of the LM loss) of the whole model, batch x seq
                tokens;
  decode:       one generation step of the whole model with a KV cache (1 new token per sequence,
                gen-batch sequences), averaged over --new-tokens steps after a --prompt-len prompt;
  block_train:  forward + backward of layer 0's MoE block alone on [batch, seq, d] inputs;
  block_decode: forward of layer 0's MoE block alone on [gen-batch, 1, d] inputs.
Printed: per-round seconds (min / median / max) and the ratio ours / reference per round.

  python tools/bench_hf_ce_block.py                       # OLMoE and Phi-MoE, 2 layers, d 1024
  python tools/bench_hf_ce_block.py --model olmoe --rounds 7 --threads 1   # shared / noisy machine
  python tools/bench_hf_ce_block.py --smoke --json        # tiny shapes: outputs checked, no timing claims
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


# ------------------------------------------------------------------------------------------
# the reference block (plain torch, from the description above)
# ------------------------------------------------------------------------------------------


class RefCEMLP(nn.Module):
    """One expert of the reference: per-expert nn.Linear, CE vectors applied around them."""

    def __init__(self, d, ffn, act):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.act_fn = act

    def forward(self, x, e1, e2, e3):
        return self.down_proj((self.act_fn(self.gate_proj(x * e1)) * self.up_proj(x * e3)) * e2)


class RefCEBlock(nn.Module):
    """The reference compressed-MoE block: the router's top-k, the first k_m main (raw weights for
    OLMoE, sparsemixer weights for Phi-MoE), the last k_a compressed (weights renormalised), one
    [n, 3, max(d, ffn)] table of CE vectors (gate, down, up), an expert loop."""

    def __init__(self, d, ffn, n, top_k, k_a, act, router=None, input_jitter=0.0):
        super().__init__()
        self.d, self.ffn, self.top_k, self.k_a = d, ffn, top_k, k_a
        self.router = router  # Phi-MoE: the stock sparsemixer router module; OLMoE: softmax top-k
        self.gate = nn.Linear(d, n, bias=False) if router is None else None
        self.experts = nn.ModuleList(RefCEMLP(d, ffn, act) for _ in range(n))
        self.ces = nn.Parameter(torch.ones(n, 3, max(d, ffn)))
        self.input_jitter = input_jitter

    def route(self, x):
        if self.router is not None:
            _, w, idx = self.router(x)
        else:
            probs = F.softmax(self.gate(x), dim=1, dtype=torch.float)
            w, idx = torch.topk(probs, self.top_k, dim=-1)
        k_m = self.top_k - self.k_a
        aux_w = w[:, k_m:].float()
        aux_w = aux_w / aux_w.sum(dim=-1, keepdim=True)
        return idx[:, :k_m], w[:, :k_m].to(x.dtype), idx[:, k_m:], aux_w

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        if self.training and self.input_jitter > 0:  # Phi-MoE's block jitter, as the stock block
            hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        x = hidden_states.view(-1, d)
        main_idx, main_w, aux_idx, aux_w = self.route(x)
        ces = (aux_w[:, :, None, None] * self.ces[aux_idx]).sum(dim=1).to(x.dtype)  # [T, 3, D]
        e1, e2, e3 = ces[:, 0, : self.d], ces[:, 1, : self.ffn], ces[:, 2, : self.d]
        out = torch.zeros_like(x)
        mask = F.one_hot(main_idx, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            rank, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            y = expert(x[tok], e1[tok], e2[tok], e3[tok]) * main_w[tok, rank, None]
            out.index_add_(0, tok, y.to(x.dtype))
        return out.view(b, s, d)


def reference_block_from(block, family):
    """A RefCEBlock holding the weights of one of our HF CE blocks (ia3 variant)."""
    ex, ce = block.experts, block.ce
    n, two_f, d = ex.gate_up_proj.shape
    f = two_f // 2
    if family == "olmoe":
        ref = RefCEBlock(d, f, n, block.top_k, block.num_compressed, ex.act_fn)
        ref.gate.weight.data.copy_(block.gate.weight.data)
    else:
        ref = RefCEBlock(d, f, n, block.top_k, block.num_compressed, ex.act_fn,
                         router=copy.deepcopy(block.router), input_jitter=block.input_jitter_noise)
    with torch.no_grad():
        for e, mlp in enumerate(ref.experts):
            mlp.gate_proj.weight.copy_(ex.gate_up_proj[e, :f])
            mlp.up_proj.weight.copy_(ex.gate_up_proj[e, f:])
            mlp.down_proj.weight.copy_(ex.down_proj[e])
        ref.ces[:, 0, :d].copy_(ce.gate)
        ref.ces[:, 1, :f].copy_(ce.down)
        ref.ces[:, 2, :d].copy_(ce.up)
    return ref.to(ex.gate_up_proj.dtype)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


def build_pair(family, args):
    """(ours, reference): our HF CE model with random weights and random CE tables, and a copy of it
    whose MoE blocks are reference blocks with the same weights."""
    torch.manual_seed(args.seed)
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=max(args.seq, args.prompt_len + args.new_tokens) + 8,
                  moe_ce_variant="ia3", pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if family == "olmoe":
        from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig as Config
        from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM as Model

        cfg = Config(num_experts=args.experts, num_experts_per_tok=args.topk, moe_ce_num_compressed=args.ce,
                     norm_topk_prob=False, **common)
    else:
        from megatron_ce.hf.configuration_phimoe_ce import PhimoeCEConfig as Config
        from megatron_ce.hf.modeling_phimoe_ce import PhimoeCEForCausalLM as Model

        cfg = Config(num_local_experts=args.experts, num_experts_per_tok=2, moe_ce_num_compressed=1,
                     attention_bias=True, lm_head_bias=True, **common)
    ours = Model(cfg).to(args.dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".ce." in name:  # CE tables away from 1, so the tables matter for the outputs
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    ref = copy.deepcopy(ours)
    for layer in ref.model.layers:
        layer.mlp = reference_block_from(layer.mlp, family)
    return ours, ref


def _assert_close(a, b, what, dtype):
    """Relative to the size of the values (tiny-init models have small block outputs)."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = float(b.detach().abs().max()) or 1.0
    err = float((a.detach() - b.detach()).abs().max())
    assert err <= tol * scale, f"{what}: ours and the reference differ by {err:.3e} (scale {scale:.3e})"
    return err / scale


def check_same_outputs(ours, ref, args):
    """Ours == reference: every MoE block's output and its input / CE-table / expert-weight gradients
    on unit-scale inputs, and the whole model's logits (eval mode, so routing is deterministic).
    Returns the largest relative difference seen."""
    ours.eval(), ref.eval()
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for layer, (a, b) in enumerate(zip(ours.model.layers, ref.model.layers)):
        x = torch.randn(2, min(args.seq, 32), args.hidden, generator=g).to(args.dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a.mlp(xa), b.mlp(xb)
        worst = max(worst, _assert_close(ya, yb, f"layer {layer} block output", args.dtype))
        dy = torch.randn(ya.shape, generator=g).to(args.dtype)
        ya.backward(dy), yb.backward(dy)
        f = args.ffn
        pairs = [("input grad", xa.grad, xb.grad),
                 ("theta_gate grad", a.mlp.ce.gate.grad, b.mlp.ces.grad[:, 0, : args.hidden]),
                 ("theta_down grad", a.mlp.ce.down.grad, b.mlp.ces.grad[:, 1, :f]),
                 ("theta_up grad", a.mlp.ce.up.grad, b.mlp.ces.grad[:, 2, : args.hidden])]
        gu, down = a.mlp.experts.gate_up_proj.grad, a.mlp.experts.down_proj.grad
        for e, mlp in enumerate(b.mlp.experts):
            if mlp.down_proj.weight.grad is None:  # expert not chosen: ours must have zero grads
                mlp.gate_proj.weight.grad = torch.zeros_like(mlp.gate_proj.weight)
                mlp.up_proj.weight.grad = torch.zeros_like(mlp.up_proj.weight)
                mlp.down_proj.weight.grad = torch.zeros_like(mlp.down_proj.weight)
            pairs += [(f"expert {e} W_gate grad", gu[e, :f], mlp.gate_proj.weight.grad),
                      (f"expert {e} W_up grad", gu[e, f:], mlp.up_proj.weight.grad),
                      (f"expert {e} W_down grad", down[e], mlp.down_proj.weight.grad)]
        for what, ga, gb in pairs:
            worst = max(worst, _assert_close(ga, gb, f"layer {layer} {what}", args.dtype))
    ours.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
    ids = torch.randint(1, args.vocab, (2, min(args.seq, 32)), generator=g)
    with torch.no_grad():
        worst = max(worst, _assert_close(ours(ids).logits, ref(ids).logits, "logits", args.dtype))
    return worst


# ------------------------------------------------------------------------------------------
# timed operations
# ------------------------------------------------------------------------------------------


def train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


@torch.no_grad()
def decode_steps(model, prompt, new_tokens):
    """Seconds per decode step (1 new token per sequence with a KV cache) after the prompt."""
    model.eval()
    out = model(prompt, use_cache=True)
    cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(tok, cache=cache, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new_tokens


def block_train_step(block, x, dy):
    block.train()
    block.zero_grad(set_to_none=True)
    block(x.clone().requires_grad_()).backward(dy)


@torch.no_grad()
def block_decode(block, xs):
    """Seconds per call of the block alone on one new token per sequence ([gen_batch, 1, d])."""
    block.eval()
    t0 = time.perf_counter()
    for x in xs:
        block(x)
    return (time.perf_counter() - t0) / len(xs)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(ops, rounds, warmup):
    """{name: [seconds per round]}: every round runs each op once, the order alternating."""
    names = list(ops)
    for _ in range(warmup):
        for n in names:
            ops[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            t = ops[n]()
            times[n].append(t)
    return times


def spread(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def bench_family(family, args):
    ours, ref = build_pair(family, args)
    max_diff = check_same_outputs(ours, ref, args)
    g = torch.Generator().manual_seed(7)
    train_ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(1, args.vocab, (args.gen_batch, args.prompt_len), generator=g)
    res = {"max_rel_diff": max_diff}
    bo, br = ours.model.layers[0].mlp, ref.model.layers[0].mlp
    x = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(args.dtype)
    dy = torch.randn(x.shape, generator=g).to(args.dtype)
    xs = [torch.randn(args.gen_batch, 1, args.hidden, generator=g).to(args.dtype) for _ in range(args.new_tokens)]
    ops = {
        "train": {"ours": lambda: timed(lambda: train_step(ours, train_ids)),
                  "reference": lambda: timed(lambda: train_step(ref, train_ids))},
        "decode": {"ours": lambda: decode_steps(ours, prompt, args.new_tokens),
                   "reference": lambda: decode_steps(ref, prompt, args.new_tokens)},
        "block_train": {"ours": lambda: timed(lambda: block_train_step(bo, x, dy)),
                        "reference": lambda: timed(lambda: block_train_step(br, x, dy))},
        "block_decode": {"ours": lambda: block_decode(bo, xs), "reference": lambda: block_decode(br, xs)},
    }
    for what, pair in ops.items():
        times = interleaved(pair, args.rounds, args.warmup)
        ratios = [a / b for a, b in zip(times["ours"], times["reference"])]
        res[what] = {"ours_s": spread(times["ours"]), "reference_s": spread(times["reference"]),
                     "ratio_ours_over_reference": spread(ratios)}
    return res


def _fmt(s):
    return f"{s['min']:.4f} / {s['median']:.4f} / {s['max']:.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("olmoe", "phimoe", "both"), default="both")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=512, help="expert intermediate size (OLMoE: hidden / 2)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4, help="OLMoE top-k (Phi-MoE is top-2: 1 main + 1 CE)")
    ap.add_argument("--ce", type=int, default=2, help="OLMoE compressed experts among the top-k")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 round: checks outputs, no timing claims")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.layers, args.hidden, args.ffn, args.heads, args.experts = 2, 32, 48, 4, 6
        args.vocab, args.batch, args.seq, args.gen_batch, args.prompt_len, args.new_tokens = 64, 2, 16, 2, 4, 2
        args.rounds, args.warmup = 1, 0
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    families = ["olmoe", "phimoe"] if args.model == "both" else [args.model]
    config = {k: (str(v) if k == "dtype" else v) for k, v in vars(args).items()}
    config["torch_threads"] = torch.get_num_threads()
    out = {"config": config}
    if args.smoke and not args.json:
        print("smoke: tiny shapes, one round without warm-up; the timings mean nothing")
    for family in families:
        out[family] = res = bench_family(family, args)
        if not args.json:
            print(f"{family}: {args.layers} layers, d {args.hidden}, ffn {args.ffn}, {args.experts} experts; "
                  f"{torch.get_num_threads()} threads; outputs match (max rel. diff {res['max_rel_diff']:.1e})")
            for what in ("train", "decode", "block_train", "block_decode"):
                r = res[what]
                print(f"  {what:12s} ours {_fmt(r['ours_s'])} s   reference {_fmt(r['reference_s'])} s   "
                      f"ours/ref {_fmt(r['ratio_ours_over_reference'])}  (min / median / max of {args.rounds})")
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
