"""Recovery of the top-k_m -> top-k gap and its paired bootstrap confidence intervals.

recovery = (acc_CE - acc_low) / (acc_high - acc_low): 0 means CE is no better than running k_m experts,
1 means it matches running all k. All variants of one pretraining seed are scored on the same test items,
so a bootstrap resample draws item indices once and applies them to every variant (paired). A resample
whose gap is exactly 0 has no recovery; it is dropped and counted (`undefined`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np


def recovery(ce: float, low: float, high: float) -> Optional[float]:
    """None when there is no gap to recover."""
    return None if abs(high - low) < 1e-12 else (ce - low) / (high - low)


def _ratio(ce: np.ndarray, low: np.ndarray, high: np.ndarray):
    gap = high - low
    ok = np.abs(gap) >= 1e-12
    return (ce[ok] - low[ok]) / gap[ok], int((~ok).sum())


def bootstrap_items(high: Sequence[float], low: Sequence[float], ce: Sequence[float], n_boot: int,
                    rng: np.random.Generator):
    """Recovery of one seed under resampling of its test items (paired). Returns (samples, undefined)."""
    h, lo, c = (np.asarray(x, dtype=np.float64) for x in (high, low, ce))
    idx = rng.integers(0, len(h), size=(n_boot, len(h)))
    return _ratio(c[idx].mean(1), lo[idx].mean(1), h[idx].mean(1))


def bootstrap_gap(high: Sequence[float], low: Sequence[float], n_boot: int, rng: np.random.Generator):
    """mean(high) - mean(low) under paired resampling of the test items: is there a gap at all?"""
    h, lo = (np.asarray(x, dtype=np.float64) for x in (high, low))
    idx = rng.integers(0, len(h), size=(n_boot, len(h)))
    return h[idx].mean(1) - lo[idx].mean(1)


def bootstrap_seeds_items(high: List[Sequence[float]], low: List[Sequence[float]],
                          ce: List[Sequence[float]], n_boot: int, rng: np.random.Generator):
    """Recovery of the seed means (mean accuracy over seeds per variant) under a two-level resample:
    seeds with replacement, then the test items of each drawn seed (paired across variants)."""
    h, lo, c = (np.asarray(x, dtype=np.float64) for x in (high, low, ce))  # [seeds, items]
    n_seeds, n_items = h.shape
    s = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    idx = rng.integers(0, n_items, size=(n_boot, n_seeds, n_items))

    def means(m: np.ndarray) -> np.ndarray:
        return m[s[:, :, None], idx].mean(axis=(1, 2))

    return _ratio(means(c), means(lo), means(h))


def interval(samples: np.ndarray, level: float = 0.95) -> Optional[List[float]]:
    """Percentile interval (numpy's default linear interpolation); None without samples."""
    if len(samples) == 0:
        return None
    q = 100 * (1 - level) / 2
    return [float(np.percentile(samples, q)), float(np.percentile(samples, 100 - q))]


def recovery_report(per_seed: List[Dict[str, List[float]]], high: str, low: str, ce: str,
                    n_boot: int, seed: int = 0) -> Dict:
    """Point estimates and 95% intervals, per seed and of the seed means, for one CE row.
    per_seed[i][variant] is the 0/1 correctness vector of that variant on seed i's test items."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in per_seed:
        samples, undef = bootstrap_items(r[high], r[low], r[ce], n_boot, rng)
        rows.append(dict(point=recovery(*(float(np.mean(r[v])) for v in (ce, low, high))),
                         ci=interval(samples), undefined=undef,
                         gap=float(np.mean(r[high]) - np.mean(r[low])),
                         gap_ci=interval(bootstrap_gap(r[high], r[low], n_boot, rng)),
                         acc={v: float(np.mean(r[v])) for v in (high, low, ce)}))
    mean = {v: float(np.mean([np.mean(r[v]) for r in per_seed])) for v in (high, low, ce)}
    out = dict(high=high, low=low, ce=ce, per_seed=rows, n_boot=n_boot,
               of_means=dict(point=recovery(mean[ce], mean[low], mean[high]), acc=mean))
    if len(per_seed) > 1:
        samples, undef = bootstrap_seeds_items([r[high] for r in per_seed], [r[low] for r in per_seed],
                                               [r[ce] for r in per_seed], n_boot, rng)
        out["of_means"].update(ci=interval(samples), undefined=undef)
    return out
