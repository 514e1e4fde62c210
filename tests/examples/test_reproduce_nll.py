"""Answer-NLL recovery with paired bootstrap intervals (examples/reproduce/aggregate.py nll_recovery)
against hand-computed values, and the fallback for results stored without per-item NLLs."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))

from reproduce.aggregate import nll_recovery  # noqa: E402


def _seed(items):
    return {"variants": {v: {"nll_items": x, "nll": sum(x) / len(x)} for v, x in items.items()}}


def test_nll_recovery_hand_computed():
    # seed 0: top-4 NLL 0.1, top-2 0.5, CE 0.3 on every item -> (0.3-0.5)/(0.1-0.5) = 0.5, gap -0.4
    # seed 1: top-4 0.2, top-2 0.6, CE 0.5 -> 0.25; seed means 0.15 / 0.55 / 0.4 -> 0.375
    s0 = _seed({"top-4": [0.1] * 6, "top-2": [0.5] * 6, "ce": [0.3] * 6})
    s1 = _seed({"top-4": [0.2] * 6, "top-2": [0.6] * 6, "ce": [0.5] * 6})
    rep = nll_recovery([s0, s1], "ce", "top-4", "top-2", n_boot=300)
    assert [r["point"] for r in rep["per_seed"]] == pytest.approx([0.5, 0.25])
    assert rep["of_means"]["point"] == pytest.approx(0.375)
    assert rep["per_seed"][0]["gap"] == pytest.approx(-0.4)
    # constant items: every item resample gives the point, so the intervals collapse onto it
    assert rep["per_seed"][0]["ci"] == pytest.approx([0.5, 0.5])
    assert rep["per_seed"][1]["gap_ci"] == pytest.approx([-0.4, -0.4])
    lo, hi = rep["of_means"]["ci"]
    assert 0.25 - 1e-9 <= lo <= 0.375 <= hi <= 0.5 + 1e-9  # seeds resampled: between the two seeds


def test_nll_recovery_without_items_gives_points_only():
    s0 = {"variants": {"top-4": {"nll": 0.1}, "top-2": {"nll": 0.5}, "ce": {"nll": 0.3}}}
    rep = nll_recovery([s0], "ce", "top-4", "top-2", n_boot=300)
    assert rep["per_seed"][0]["point"] == pytest.approx(0.5) and rep["per_seed"][0]["ci"] is None
    assert rep["of_means"]["point"] == pytest.approx(0.5)
