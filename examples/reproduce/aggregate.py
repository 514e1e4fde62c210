"""Seed results -> per-variant summaries, recovery rows with bootstrap intervals, thread sensitivity."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

from .stats import recovery, recovery_report


def mean_sd(xs: List[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def arch_key(spec: Dict) -> str:
    """Variants with equal keys run the same computation (latency is measured once per key)."""
    return f"{spec['topk']}/{spec['k_a']}/{spec['ce'] if spec['k_a'] else '-'}/{spec['tau']}"


def summarise(seeds: List[Dict], latency: Dict[str, List[float]]) -> Dict[str, Dict]:
    out = {}
    for name, first in seeds[0]["variants"].items():
        rs = [s["variants"][name] for s in seeds]
        acc, acc_sd = mean_sd([r["acc"] for r in rs])
        nll, nll_sd = mean_sd([r["nll"] for r in rs])
        drifts = [r["theta_drift"] for r in rs if r["theta_drift"] is not None]
        g = dict(spec=first["spec"], acc_mean=acc, acc_std=acc_sd, acc_seeds=[r["acc"] for r in rs],
                 nll_mean=nll, nll_std=nll_sd, acc0_mean=statistics.mean(r["acc0"] for r in rs),
                 nll0_mean=statistics.mean(r["nll0"] for r in rs),
                 val_acc_mean=statistics.mean(r["val_acc"] for r in rs),
                 theta_drift_max=max(drifts) if drifts else None,
                 active_params=statistics.mean(r["active_params"] for r in rs),
                 selected=[r.get("selected") for r in rs] if "selected" in first else None)
        if "main_per_layer" in first:
            g["main_mean"] = statistics.mean(statistics.mean(r["main_per_layer"]) for r in rs)
        lat = latency.get(arch_key(first["spec"]))
        if lat:
            g["lat_mean"], g["lat_std"] = mean_sd(lat)
        out[name] = g
    return out


def recoveries(seeds: List[Dict], rows: List[tuple], n_boot: int) -> List[Dict]:
    """Exact-match and answer-NLL recovery of every CE row, each with paired bootstrap intervals over the
    test items (the NLL ones need per-item NLLs, `nll_items`, stored since Run D)."""
    out = []
    for ce, high, low in rows:
        if any(v not in seeds[0]["variants"] for v in (ce, high, low)):
            continue
        per_seed = [{v: s["variants"][v]["correct"] for v in (ce, high, low)} for s in seeds]
        rep = recovery_report(per_seed, high, low, ce, n_boot)
        rep["nll"] = nll_recovery(seeds, ce, high, low, n_boot)
        out.append(rep)
    return out


def nll_recovery(seeds: List[Dict], ce: str, high: str, low: str, n_boot: int) -> Dict:
    """recovery_report on the per-item answer NLLs; (nll_CE - nll_low)/(nll_high - nll_low) is the same
    formula, the gap (high - low) is negative when the reference is better. Results without per-item
    NLLs (before Run D) get the point estimates only."""
    if all("nll_items" in s["variants"][v] for s in seeds for v in (ce, high, low)):
        per_seed = [{v: s["variants"][v]["nll_items"] for v in (ce, high, low)} for s in seeds]
        return recovery_report(per_seed, high, low, ce, n_boot, seed=1)
    nll = [[s["variants"][v]["nll"] for s in seeds] for v in (ce, low, high)]
    return dict(per_seed=[dict(point=recovery(c, lo, h), ci=None, gap=h - lo, gap_ci=None, undefined=0,
                               acc={ce: c, low: lo, high: h}) for c, lo, h in zip(*nll)],
                of_means=dict(point=recovery(*(statistics.mean(x) for x in nll))))


def sensitivity(ref: Dict, other: Dict, rows: List[tuple]) -> Dict:
    """The same pretraining seed run with another thread count: per variant the change of test exact
    match, how many test items flipped, the NLL change, and the recovery under each."""
    var = {}
    for name, r2 in other["variants"].items():
        r1 = ref["variants"][name]
        var[name] = dict(acc=[r1["acc"], r2["acc"]], nll=[r1["nll"], r2["nll"]],
                         flipped=sum(a != b for a, b in zip(r1["correct"], r2["correct"])),
                         selected=[r1.get("selected"), r2.get("selected")])
    rec = {}
    for ce, high, low in rows:
        if all(v in other["variants"] for v in (ce, high, low)):
            rec[ce] = [recovery(*(s["variants"][v]["acc"] for v in (ce, low, high))) for s in (ref, other)]
    return dict(seed=ref["seed"], threads=[ref["threads"], other["threads"]],
                pretrain_loss=[ref["pretrain_loss"], other["pretrain_loss"]], variants=var, recovery=rec)


def fmt_rec(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def fmt_ci(ci: Optional[List[float]]) -> str:
    return "n/a" if ci is None else f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]%"
