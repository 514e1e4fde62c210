"""Exact total and active parameter counts of an OLMoE / Phi-MoE model with and without CE.

The megatron-core GPTModel is built on the meta device (no memory) and its parameters are sorted by
name into three groups:
  experts  `...mlp.experts...`  (per layer: n experts of equal size; k_m of them active per token)
  ce       `...mlp.ce...`       (per layer: n tables of 2*d + ffn (ia3) or d (hidden); k_a active)
  dense    everything else: embeddings, attention, norms, router, output layer (all active: every
           token uses the router weights)
active = dense + sum_layers (k_m * expert_size + k_a * ce_size).

The paper's formula is the same sum with the paper's own non-MoE figure (Phi-MoE: "2.4B", an
approximation; OLMoE: not stated, we use the exact non-expert count without the router, which
reproduces its 1.28B / 878M) and 3*d*ffn per expert, 2*d+ffn per compressed expert.

Under the adaptive split (--moe-ce-split mass) k_m varies per token: `expected_cost` measures it on data
with the trainer's routing statistics and reports the expected active count (see the section below).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from megatron_ce.models import registry
from megatron_ce.paper.configs import num_experts



def _is_released(family: str, cfg: Dict[str, Any]) -> bool:
    ref = registry.presets(family).paper_hf_config
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
    return all(cfg.get(k) == ref[k] for k in keys) and num_experts(cfg) == num_experts(ref)


def build_meta_model(family: str, cfg: Dict[str, Any], k_a: int = 0, variant: str = "ia3"):
    """The megatron-core model of `cfg` on the meta device (parallel state must be initialised)."""
    build = registry.get_family(family).build_model
    with torch.device("meta"):
        return build(cfg, moe_ce_num_compressed=k_a, moe_ce_variant=variant)


def group_counts(model) -> Dict[str, int]:
    """{"dense", "experts", "ce", "router"} parameter counts of a model (router is part of dense)."""
    out = dict(dense=0, experts=0, ce=0, router=0)
    for name, p in model.named_parameters():
        n = p.numel()
        if ".mlp.experts." in name:
            out["experts"] += n
        elif ".mlp.ce." in name:
            out["ce"] += n
        else:
            out["dense"] += n
            if ".mlp.router." in name:
                out["router"] += n
    return out


def count_params(
    family: str,
    cfg: Dict[str, Any],
    topk: Optional[int] = None,
    k_a: int = 0,
    variant: str = "ia3",
) -> Dict[str, Any]:
    """Exact counts for top-`topk` (default: the config's) without CE, and with k_a of them compressed."""
    n = num_experts(cfg)
    L = int(cfg["num_hidden_layers"])
    d, ffn = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    topk = int(topk or cfg["num_experts_per_tok"])
    if not 0 <= k_a < topk:
        raise ValueError(f"--moe-ce-num-compressed={k_a} must be in [0, topk={topk})")
    if topk > n:
        raise ValueError(f"--moe-router-topk={topk} > {n} experts")
    k_m = topk - k_a
    # CE table sizes do not depend on k_a (>0): build with k_a=1 so any config top-k >= 2 is valid.
    # The router's top-k has no parameters, so the config's own top-k is used to build.
    g = group_counts(build_meta_model(family, cfg, k_a=1 if k_a else 0, variant=variant))
    expert_size = g["experts"] // (L * n)
    ce_size = g["ce"] // (L * n)
    assert expert_size * L * n == g["experts"] and ce_size * L * n == g["ce"]

    def active(k_main, k_aux):
        return g["dense"] + L * (k_main * expert_size + k_aux * ce_size)

    res: Dict[str, Any] = dict(
        model=family, layers=L, hidden=d, ffn=ffn, experts=n, topk=topk, k_main=k_m, k_aux=k_a,
        variant=variant if k_a else None,
        dense_params=g["dense"], router_params=g["router"], expert_params_each=expert_size,
        ce_params_each=ce_size,
        total_base=g["dense"] + g["experts"],
        total_ce=g["dense"] + g["experts"] + (g["ce"] if k_a else 0),
        active_base=active(topk, 0),
        active_topk_main=active(k_m, 0),
        active_ce=active(k_m, k_a),
    )
    res["reduction_pct"] = 100.0 * (res["active_base"] - res["active_ce"]) / res["active_base"]

    # the paper's formula: non-MoE + L * (k_m * 3*d*ffn + k_a * (2d + ffn))
    paper = registry.presets(family).paper_figures if _is_released(family, cfg) else {}
    non_moe = paper.get("non_moe") or (g["dense"] - g["router"])
    p_base = non_moe + L * topk * 3 * d * ffn
    p_ce = non_moe + L * (k_m * 3 * d * ffn + k_a * (2 * d + ffn))
    res["formula"] = dict(
        non_moe=int(non_moe), non_moe_source="paper's approximation" if paper.get("non_moe") else
        "exact non-expert params without the router",
        active_base=int(p_base), active_ce=int(p_ce), reduction_pct=100.0 * (p_base - p_ce) / p_base,
    )
    if paper and topk == paper["topk"] and k_a == paper["k_a"] and variant == "ia3":
        res["paper_stated"] = {k: paper[k] for k in ("active_base", "active_ce", "reduction_pct")}
    return res


def format_report(r: Dict[str, Any]) -> str:
    def n(x):
        return f"{int(x):,}"

    lines = [
        f"model {r['model']}: {r['layers']} layers, d {r['hidden']}, ffn {r['ffn']}, {r['experts']} experts, "
        f"top-{r['topk']} -> {r['k_main']} main + {r['k_aux']} compressed"
        + (f" ({r['variant']})" if r["variant"] else ""),
        f"  per expert {n(r['expert_params_each'])}, per compressed expert {n(r['ce_params_each'])}, "
        f"dense (non-expert, incl. router {n(r['router_params'])}) {n(r['dense_params'])}",
        "",
        f"  {'':34s} {'exact (model)':>16s} {'paper formula':>16s} {'paper stated':>14s}",
    ]
    f, ps = r["formula"], r.get("paper_stated", {})

    def row(label, exact, formula=None, stated=None):
        fs = n(formula) if formula is not None else ""
        ss = f"{stated / 1e9:.3g}B" if stated is not None and stated >= 1e9 else (
            f"{stated / 1e6:.3g}M" if stated is not None else "")
        lines.append(f"  {label:34s} {n(exact):>16s} {fs:>16s} {ss:>14s}")

    row("total, no CE", r["total_base"])
    row("total, with CE", r["total_ce"])
    row(f"active, top-{r['topk']}", r["active_base"], f["active_base"], ps.get("active_base"))
    row(f"active, top-{r['k_main']} (no CE)", r["active_topk_main"])
    row(f"active, top-{r['k_main']} + {r['k_aux']} CE", r["active_ce"], f["active_ce"], ps.get("active_ce"))
    red_s = f"-{ps['reduction_pct']:.1f}%" if ps else ""
    lines.append(f"  {'active reduction':34s} {'-%.1f%%' % r['reduction_pct']:>16s} "
                 f"{'-%.1f%%' % f['reduction_pct']:>16s} {red_s:>14s}")
    lines.append(f"  paper formula non-MoE = {n(f['non_moe'])} ({f['non_moe_source']})")
    diff = f["non_moe"] - r["dense_params"]
    if diff:
        why = (
            "the paper approximates the non-MoE parameters (embeddings, attention, norms, lm_head) as "
            f"{n(f['non_moe'])}; the model has {n(r['dense_params'])} (incl. router)"
            if "approximation" in f["non_moe_source"]
            else "the paper's figures leave out the router weights, which every token uses (counted here)"
        )
        lines.append(f"  exact - formula = {n(r['active_base'] - f['active_base'])} (top-{r['topk']}): {why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Expected active parameters under the adaptive split (--moe-ce-split mass)
# ------------------------------------------------------------------------------------------------
#
# With the mass split the number of main experts k_m(t) varies per token, so "active parameters"
# is an expectation over tokens, measured on data (it needs the router's probabilities). A token
# with k_m main experts has k_a = k - k_m compressed experts: the layer reads k - min_main aux slots,
# but a slot whose rank runs as a main expert has weight 0 (and a token with k_m = k has all-zero
# weights and runs its main experts unmodulated), so it contributes nothing. Active per token is
# linear in k_m, hence
#     E[active] = dense + sum_layers (E[k_m] * expert_size + (k - E[k_m]) * ce_size).


def expected_active_params(counts: Dict[str, int], main_per_token_per_layer, topk: int) -> float:
    """dense + sum over MoE layers of (m * expert + (topk - m) * ce), m = mean main experts per token.

    counts: {"dense", "expert_each", "ce_each"} (parameters; dense includes the router)."""
    total = float(counts["dense"])
    for m in main_per_token_per_layer:
        if not 0 <= m <= topk:
            raise ValueError(f"mean main experts per token {m} is outside [0, top-k={topk}]")
        total += m * counts["expert_each"] + (topk - m) * counts["ce_each"]
    return total


def model_counts(gpt) -> Dict[str, int]:
    """{"dense", "router", "expert_each", "ce_each", "moe_layers", "experts"} of a built GPTModel."""
    from megatron_ce.training.metrics import moe_layers

    g = group_counts(gpt)
    L, n = len(moe_layers(gpt)), gpt.config.num_moe_experts
    out = dict(dense=g["dense"], router=g["router"], expert_each=g["experts"] // (L * n),
               ce_each=g["ce"] // (L * n), moe_layers=L, experts=n)
    assert out["expert_each"] * L * n == g["experts"] and out["ce_each"] * L * n == g["ce"]
    return out


@torch.no_grad()
def measure_main_per_token(gpt, batches) -> Dict[str, Any]:
    """Forward `batches` (dicts with tokens, position_ids, attention_mask or None) and return the
    trainer's routing statistics (megatron_ce.training.metrics.RoutingStats): per MoE layer the mean
    number of main experts per token and its histogram over 0..E, plus the token count.

    Every token of every batch is counted: pass batches without padding. Needs torch.distributed
    (world size 1 is enough)."""
    from megatron_ce.training.metrics import RoutingStats

    cfg = gpt.config
    stats = RoutingStats(gpt, cfg.num_layers, cfg.num_moe_experts, inference=True)
    tokens = 0
    try:
        gpt.eval()
        for b in batches:
            gpt(b["tokens"], b["position_ids"], b.get("attention_mask"))
            tokens += b["tokens"].numel()
        r = stats.reduce_and_reset(topk=cfg.moe_router_topk, aux_coeff=0.0)
    finally:
        stats.close()
    return dict(layer=r["layer"], main_per_token=r["main_per_token"],
                main_per_token_hist=[[int(c) for c in h] for h in r["main_per_token_hist"]],
                aux_mass=r["aux_mass"], tokens=tokens)


def unpadded_batches(dataset, num_samples: int, micro_batch_size: int):
    """Batches of the first `num_samples` rows of an SFT dataset with the padding cut off: each row is
    trimmed to its real tokens (a causal model's outputs on them do not depend on what follows) and
    rows of equal length are batched together. Block-diagonal masks for boundary-packed rows."""
    from megatron_ce.data import packed_attention_mask
    from megatron_ce.training.data import needs_attention_mask

    with_mask = needs_attention_mask(dataset)
    by_len: Dict[int, list] = {}
    for i in range(min(num_samples, len(dataset))):
        it = dataset[i]
        n = int((it["document_ids"] >= 0).sum())  # padding has document id -1, at the end
        if n > 0:
            by_len.setdefault(n, []).append({k: it[k][:n] for k in ("tokens", "position_ids", "document_ids")})
    for n, rows in sorted(by_len.items()):
        for j in range(0, len(rows), micro_batch_size):
            chunk = rows[j:j + micro_batch_size]
            b = {k: torch.stack([r[k] for r in chunk]) for k in ("tokens", "position_ids", "document_ids")}
            b["attention_mask"] = packed_attention_mask(b["document_ids"]) if with_mask else None
            yield b


def expected_cost(gpt, batches, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Measured expected active parameters per token of a (mass-split) CE model over `batches`."""
    cfg = gpt.config
    k = cfg.moe_router_topk
    counts = model_counts(gpt)
    m = measure_main_per_token(gpt, batches)
    if counts["moe_layers"] != len(m["layer"]):
        raise ValueError(f"{counts['moe_layers']} MoE layers but routing seen in {len(m['layer'])}")
    split = getattr(cfg, "moe_ce_split", "fixed")
    min_main = cfg.moe_ce_min_main if split == "mass" else k - cfg.moe_ce_num_compressed
    max_main = cfg.moe_ce_max_main if split == "mass" else min_main
    L = counts["moe_layers"]

    def fixed(k_main):  # every token with k_main main experts and k - k_main compressed
        return counts["dense"] + L * (k_main * counts["expert_each"] + (k - k_main) * counts["ce_each"])

    hist = torch.tensor(m["main_per_token_hist"], dtype=torch.float64).sum(0)
    res = dict(
        (meta or {}), split=split, tau=cfg.moe_ce_main_mass if split == "mass" else None, topk=k,
        min_main=min_main, max_main=max_main, ce_slots=cfg.moe_ce_num_compressed, variant=cfg.moe_ce_variant,
        dense_params=counts["dense"], router_params=counts["router"], expert_each=counts["expert_each"],
        ce_each=counts["ce_each"], moe_layers=L, experts=counts["experts"],
        tokens=m["tokens"], layer=m["layer"], main_per_token=m["main_per_token"],
        main_per_token_hist=m["main_per_token_hist"], aux_mass=m["aux_mass"],
        main_per_token_mean=sum(m["main_per_token"]) / L,
        main_share=[float(c) / float(hist.sum()) for c in hist[: k + 1]],  # all layers, k_m = 0..k
        expected_active=expected_active_params(counts, m["main_per_token"], k),
        active_topk=fixed(k),  # k main experts, no compressed: plain top-k
        active_fixed_min=fixed(min_main),
    )
    res["reduction_pct"] = 100.0 * (res["active_topk"] - res["expected_active"]) / res["active_topk"]
    return res


def format_expected_report(r: Dict[str, Any]) -> str:
    k, L = r["topk"], r["moe_layers"]
    rule = (f"mass split tau={r['tau']:g}, main experts in [{r['min_main']}, {r['max_main']}]"
            if r["split"] == "mass" else f"fixed split, {r['min_main']} main")
    lines = [
        f"top-{k} of {r['experts']} experts, {L} MoE layers, {rule} ({r['variant']}); "
        f"measured on {r['tokens']:,} tokens" + (f" of {r['data']}" if r.get("data") else ""),
        f"  per expert {r['expert_each']:,}, per compressed expert {r['ce_each']:,}, dense (incl. router "
        f"{r['router_params']:,}) {r['dense_params']:,}",
        "",
        f"  {'layer':>5s} {'mean k_m':>9s} {'mean k_a':>9s} {'aux mass':>9s}  tokens with k_m = 1..{k}",
    ]
    for n, mk, a, h in zip(r["layer"], r["main_per_token"], r["aux_mass"], r["main_per_token_hist"]):
        tot = sum(h) or 1
        dist = " ".join(f"{100 * c / tot:5.1f}%" for c in h[1: k + 1])
        lines.append(f"  {n:5d} {mk:9.3f} {k - mk:9.3f} {a:9.3f}  {dist}")
    lines += [
        f"  {'mean':>5s} {r['main_per_token_mean']:9.3f} {k - r['main_per_token_mean']:9.3f}",
        "",
        f"  expected active params / token  {r['expected_active']:>16,.0f}  (-{r['reduction_pct']:.1f}% vs top-{k})",
        f"  active, top-{k} (no CE)          {r['active_topk']:>16,}",
        f"  active, top-{r['min_main']} + {k - r['min_main']} CE (fixed)    {r['active_fixed_min']:>16,}",
    ]
    return "\n".join(lines)
