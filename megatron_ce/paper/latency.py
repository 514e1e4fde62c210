"""The paper's latency method on HF transformers models with a KV cache (transformers' `generate`).

One model per run; its MoE blocks are our HF CE block (`megatron_ce.hf.modeling_olmoe_ce.
OlmoeCESparseMoeBlock`), holding both CE variants' tables, and are switched between the measured
settings, so every setting runs the same weights and the same expert code:
  top-k            k main experts, no CE
  top-k/2          k/2 main experts, no CE (the router still takes its top-k; only the first k/2 are used)
  top-k/2+CE-ia3   k/2 main + k/2 compressed, three-vector tables
  top-k/2+CE-hidden
Phi-MoE has no HF CE export code yet: its blocks are the same CE block on transformers' PhimoeForCausalLM
with the sparsemixer router (eval path; pick 1 main, pick 2 compressed with weight 1, as in the paper).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from megatron_ce.models import registry
from megatron_ce.paper.configs import num_experts


def scaled_config(family: str, cfg: Dict[str, Any], num_layers=None, scale: int = 1, experts=None) -> Dict[str, Any]:
    """Reduced depth (num_layers) and width (hidden, ffn and heads divided by `scale`; head_dim kept)."""
    cfg = dict(cfg)
    if num_layers:
        cfg["num_hidden_layers"] = int(num_layers)
    if scale > 1:
        for k in ("hidden_size", "intermediate_size", "num_attention_heads"):
            if cfg[k] % scale:
                raise ValueError(f"{k}={cfg[k]} not divisible by --scale {scale}")
            cfg[k] //= scale
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"] * scale
        cfg["num_key_value_heads"] = max(1, kv // scale)
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if experts:
        cfg[registry.presets(family).experts_field] = int(experts)
    return cfg


class _Tables(nn.Module):
    def __init__(self, n, d, ffn):
        super().__init__()
        from megatron_ce.hf.ce_common import CETables

        self.ia3 = CETables(n, d, ffn, "ia3")
        self.hidden = CETables(n, d, ffn, "hidden")


def build_hf_model(family: str, cfg: Dict[str, Any], dtype=torch.float32, device="cpu", seed: int = 0):
    """A random-init HF model whose MoE blocks are CE blocks with both variants' tables (θ = 1 + noise)."""
    torch.manual_seed(seed)
    n, d, ffn = num_experts(cfg), cfg["hidden_size"], cfg["intermediate_size"]
    model, blocks = registry.get_family(family).build_hf_ce_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for b in blocks:
        b.ce_tables = _Tables(n, d, ffn)
        with torch.no_grad():
            for p in b.ce_tables.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, blocks


def set_setting(blocks, top_k: int, k_main: int, k_aux: int, variant: Optional[str]):
    for b in blocks:
        b.num_main, b.num_compressed = k_main, k_aux
        b.top_k = top_k
        if k_aux:
            b.variant = variant
            b.ce = getattr(b.ce_tables, variant)


def settings_for(top_k: int) -> List[Dict[str, Any]]:
    h = top_k // 2
    return [
        dict(name=f"top-{top_k}", k_main=top_k, k_aux=0, variant=None),
        dict(name=f"top-{h}", k_main=h, k_aux=0, variant=None),
        dict(name=f"top-{h}+CE(ia3)", k_main=h, k_aux=top_k - h, variant="ia3"),
        dict(name=f"top-{h}+CE(hidden)", k_main=h, k_aux=top_k - h, variant="hidden"),
    ]


@torch.inference_mode()
def time_generate(model, batch: int, prompt_len: int, new_tokens: int, warmup: int, iters: int, vocab: int,
                  device, seed: int = 0) -> List[float]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)

    def one():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + new_tokens
        return time.perf_counter() - t

    for _ in range(warmup):
        one()
    return [one() for _ in range(iters)]


def run_latency(family, cfg, *, batch=8, prompt_len=32, new_tokens=128, warmup=10, iters=30,
                dtype=torch.float32, device="cpu", seed=0, log=print) -> Dict[str, Any]:
    device = torch.device(device)
    model, blocks = build_hf_model(family, cfg, dtype=dtype, device=device, seed=seed)
    top_k = int(cfg["num_experts_per_tok"])
    rows = []
    set_setting(blocks, top_k, top_k, 0, None)  # one untimed call: first-call allocations, lazy init
    time_generate(model, batch, prompt_len, min(new_tokens, 2), 0, 1, cfg["vocab_size"], device, seed)
    for s in settings_for(top_k):
        set_setting(blocks, top_k, s["k_main"], s["k_aux"], s["variant"])
        times = time_generate(model, batch, prompt_len, new_tokens, warmup, iters, cfg["vocab_size"], device, seed)
        row = dict(s, mean_s=statistics.mean(times), std_s=statistics.stdev(times) if len(times) > 1 else 0.0,
                   iters=len(times))
        rows.append(row)
        log(f"  {row['name']:20s} {row['mean_s']:.4f} s ± {row['std_s']:.4f}")
    base = rows[0]["mean_s"]
    for r in rows:
        r["ratio_vs_topk"] = r["mean_s"] / base
    return dict(rows=rows, paper_s=registry.presets(family).paper_figures.get("latency_s"))


def format_table(res: Dict[str, Any]) -> str:
    lines = [f"{'setting':20s} {'mean s':>9s} {'std s':>8s} {'vs top-k':>9s}"]
    for r in res["rows"]:
        lines.append(f"{r['name']:20s} {r['mean_s']:9.4f} {r['std_s']:8.4f} {r['ratio_vs_topk']:9.3f}")
    rows = res["rows"]
    ce = rows[2]["mean_s"]
    lines.append(f"CE(ia3) overhead over top-k/2: {100 * (ce / rows[1]['mean_s'] - 1):+.1f}%;  "
                 f"CE(ia3) saving vs top-k: {100 * (1 - ce / rows[0]['mean_s']):.1f}%")
    if res.get("paper_s"):
        a, b, c = res["paper_s"]
        lines.append(f"paper (full model, its GPU): top-k {a} s, top-k/2 {b} s ({b / a:.3f}), "
                     f"top-k/2+CE {c} s ({c / a:.3f}); CE overhead over top-k/2 {100 * (c / b - 1):+.1f}%")
    return "\n".join(lines)
