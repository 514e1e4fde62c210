"""The recovery statistic and its paired bootstraps (examples/reproduce/stats.py) against hand-computed
values and against exact bootstrap distributions enumerated here independently (every equally likely
resample listed with itertools, no numpy resampling)."""

import itertools
import os
import sys
from fractions import Fraction

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))

from reproduce.stats import (bootstrap_items, bootstrap_seeds_items, interval, recovery,  # noqa: E402
                             recovery_report)


def test_recovery_hand_computed():
    assert recovery(0.8, 0.7, 0.9) == pytest.approx(0.5)  # half of a 20-point gap
    assert recovery(0.6, 0.7, 0.9) == pytest.approx(-0.5)  # CE below the baseline
    assert recovery(0.9, 0.7, 0.9) == pytest.approx(1.0)
    assert recovery(0.5, 0.7, 0.7) is None  # no gap, nothing to recover


def test_report_points_hand_computed():
    # seed 0: top-4 9/10, top-2 5/10, CE 7/10 -> (0.7-0.5)/(0.9-0.5) = 0.5
    # seed 1: top-4 8/10, top-2 6/10, CE 6/10 -> 0
    # seed means: top-4 0.85, top-2 0.55, CE 0.65 -> 0.1/0.3 = 1/3
    s0 = {"hi": [1] * 9 + [0], "lo": [1] * 5 + [0] * 5, "ce": [1] * 7 + [0] * 3}
    s1 = {"hi": [1] * 8 + [0] * 2, "lo": [0] * 4 + [1] * 6, "ce": [1] * 6 + [0] * 4}
    rep = recovery_report([s0, s1], "hi", "lo", "ce", n_boot=500)
    assert rep["per_seed"][0]["point"] == pytest.approx(0.5)
    assert rep["per_seed"][1]["point"] == pytest.approx(0.0)
    assert rep["of_means"]["point"] == pytest.approx(1 / 3)
    for r in rep["per_seed"] + [rep["of_means"]]:
        lo, hi = r["ci"]
        assert lo <= hi


def test_interval_hand_computed():
    samples = np.arange(101) / 100.0  # 0.00 .. 1.00: linear-interpolated 2.5th / 97.5th percentiles
    assert interval(samples) == pytest.approx([0.025, 0.975])
    assert interval(np.array([])) is None


def _exact_cdf(values):
    """{value: probability} of equally likely outcomes; None (no gap) kept as its own key."""
    n = len(values)
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + Fraction(1, n)
    return out


def _rec_exact(ce, lo, hi):
    gap = Fraction(sum(hi) - sum(lo), len(hi))
    return None if gap == 0 else Fraction(sum(ce) - sum(lo), len(hi)) / gap


def _compare(samples, undefined, n_boot, exact):
    undef_p = float(exact.pop(None, 0))
    assert undefined / n_boot == pytest.approx(undef_p, abs=0.01)
    defined = 1 - undef_p
    for x in sorted(exact):  # empirical CDF of the defined resamples at every support point
        p = float(sum(q for v, q in exact.items() if v <= x)) / defined
        assert np.mean(samples <= float(x) + 1e-9) == pytest.approx(p, abs=0.015), x


def test_item_bootstrap_matches_exact_enumeration():
    hi, lo, ce = [1, 1, 0, 1], [0, 1, 0, 0], [1, 0, 0, 1]
    n = len(hi)
    vals = [_rec_exact([ce[i] for i in idx], [lo[i] for i in idx], [hi[i] for i in idx])
            for idx in itertools.product(range(n), repeat=n)]  # all n^n paired resamples
    n_boot = 40_000
    samples, undefined = bootstrap_items(hi, lo, ce, n_boot, np.random.default_rng(1))
    _compare(samples, undefined, n_boot, _exact_cdf(vals))


def test_seed_and_item_bootstrap_matches_exact_enumeration():
    hi = [[1, 1], [1, 0]]
    lo = [[0, 1], [0, 0]]
    ce = [[1, 0], [1, 0]]
    vals = []
    for seeds in itertools.product(range(2), repeat=2):  # seeds with replacement ...
        for items in itertools.product(itertools.product(range(2), repeat=2), repeat=2):  # ... then items
            pick = list(zip(seeds, items))
            vals.append(_rec_exact(*([m[s][i] for s, idx in pick for i in idx] for m in (ce, lo, hi))))
    n_boot = 40_000
    samples, undefined = bootstrap_seeds_items(hi, lo, ce, n_boot, np.random.default_rng(2))
    _compare(samples, undefined, n_boot, _exact_cdf(vals))


def test_gap_bootstrap_matches_exact_enumeration():
    from reproduce.stats import bootstrap_gap

    hi, lo = [1, 1, 0], [0, 1, 1]
    vals = [Fraction(sum(hi[i] - lo[i] for i in idx), 3) for idx in itertools.product(range(3), repeat=3)]
    samples = bootstrap_gap(hi, lo, 40_000, np.random.default_rng(3))
    _compare(samples, 0, 40_000, _exact_cdf(vals))
