"""calibrate_ce_model on tiny OLMoE-CE models (one rank).

The errors asserted here are measured independently of the calibration code: the reference output is
the same weights' layer with CE off (megatron-core's own MoELayer with the full top-k), fed the
inputs the calibrated model gives it (tests/calibrate/utils.py)."""

import pytest
import torch

from megatron_ce.calibrate import CalibrationError, calibrate_ce_model, ce_layers, theta_ones
from tests.calibrate.utils import (
    batches,
    build,
    make_experts_identical,
    moe_io,
    other_tensors,
    reference_model,
    rel_error_vs_reference,
    theta_tensors,
    tiny_hf_config,
)

pytestmark = pytest.mark.usefixtures("world1")


def _before_after(model, cfg, steps, lr, data=None, **kw):
    """(error with theta = 1, error after calibration, result) on the held-out batches."""
    ref = reference_model(model, cfg)
    holdout = batches(1, n=2, b=4, seq=32)
    with theta_ones(ce_layers(model).values()):
        before = rel_error_vs_reference(model, ref, 0, holdout)
    result = calibrate_ce_model(model, data or batches(0), steps=steps, lr=lr, holdout_batches=holdout, **kw)
    return before, rel_error_vs_reference(model, ref, 0, holdout), result


def test_full_topk_mode_is_megatron_moe_layer():
    """The calibration target equals megatron-core's MoELayer with the same weights (k_a = 0)."""
    cfg = tiny_hf_config()
    model = build(cfg, 2).eval()
    ref = reference_model(model, cfg)
    layer = ce_layers(model)[0]
    for x, y_ce in moe_io(model, 0, batches(3, n=1)):
        with torch.no_grad(), layer.full_topk():
            y_full = layer(x)[0]
        y_ref = ref.decoder.layers[0].mlp(x)[0]
        torch.testing.assert_close(y_full, y_ref, rtol=1e-5, atol=1e-6)
        assert (y_ce - y_ref).abs().max() > 1e-3  # top-k_m really differs from top-k here
    assert layer.token_dispatcher.config.moe_router_topk == 2 and layer.ce is not None  # restored


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_identical_experts_error_drops(variant):
    """Identical experts: the dropped experts' share is a per-token rescaling of the main ones, which
    theta can largely express; calibration must cut the held-out output error clearly."""
    cfg = tiny_hf_config()
    model = build(cfg, 2, variant)
    make_experts_identical(model, router_scale=0.5)
    before, after, result = _before_after(model, cfg, steps=40, lr=5e-2)
    rec = result.layers[0]
    print(f"\n{variant} identical experts: err theta=1 {before:.4f} -> calibrated {after:.4f} "
          f"(ratio {after / before:.3f}), expert cosine {rec.expert_cosine:.4f}\n{result.table()}")
    assert after < 0.6 * before
    assert rec.expert_cosine == pytest.approx(1.0, abs=1e-6)
    # the reported numbers are the independently measured ones
    assert rec.rel_err_topk_m == pytest.approx(before, rel=1e-4)
    assert rec.rel_err_calibrated == pytest.approx(after, rel=1e-4)


def test_random_experts_not_worse():
    """Unrelated random experts: report the gain; the fit itself (kept even if worse) must not get
    worse on held-out data by more than a small margin."""
    cfg = tiny_hf_config()
    model = build(cfg, 2, "ia3")
    data = batches(0, n=4, b=4, seq=32)
    before, after, result = _before_after(model, cfg, steps=60, lr=5e-3, data=data, keep_if_worse=True)
    rec = result.layers[0]
    print(f"\nrandom experts: err theta=1 {before:.4f} -> calibrated {after:.4f} (ratio {after / before:.3f}), "
          f"expert cosine {rec.expert_cosine:.4f}\n{result.table()}")
    assert after <= 1.05 * before and not rec.reverted
    assert abs(rec.expert_cosine) < 0.2
    assert set(result.losses) == {"topk", "topk_m", "topk_m_ce_before", "topk_m_ce_calibrated"}


def test_fit_worse_on_holdout_is_reverted():
    """Few calibration tokens and random experts: the fit over-fits, so theta goes back to ones."""
    cfg = tiny_hf_config()
    model = build(cfg, 2, "ia3")
    before, after, result = _before_after(model, cfg, steps=60, lr=2e-2)
    rec = result.layers[0]
    print(f"\nover-fitted: err theta=1 {before:.4f}, fitted {rec.rel_err_fitted:.4f} -> kept {after:.4f}")
    assert rec.reverted and rec.rel_err_fitted > before
    assert after == pytest.approx(before, rel=1e-6)
    assert all(torch.equal(t, torch.ones_like(t)) for t in theta_tensors(model).values())


def test_layer_left_out_keeps_theta_and_weights_frozen():
    cfg = tiny_hf_config(layers=2)
    model = build(cfg, 2, "ia3")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = other_tensors(model)
    calibrate_ce_model(model, batches(0, n=2), layers={1}, steps=5, lr=5e-2)
    theta = theta_tensors(model)
    for name, t in theta.items():
        if "layers.0." in name:
            assert torch.equal(t, torch.ones_like(t)), name
        else:
            assert not torch.equal(t, torch.ones_like(t)), name
    after = other_tensors(model)
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training  # mode restored


def test_mass_split():
    mass = dict(moe_ce_split="mass", moe_ce_main_mass=0.6)
    cfg = tiny_hf_config()
    model = build(cfg, 2, "hidden", **mass)
    make_experts_identical(model, router_scale=0.5)
    before, after, result = _before_after(model, cfg, steps=40, lr=5e-2)
    print(f"\nmass split, identical experts: err theta=1 {before:.4f} -> calibrated {after:.4f}")
    assert after < 0.8 * before


def test_bad_layers_one_line():
    model = build(tiny_hf_config(), 2)
    with pytest.raises(CalibrationError, match=r"--calib-layers: \[5\]"):
        calibrate_ce_model(model, batches(0, n=1), layers={5}, steps=1)
    with pytest.raises(CalibrationError, match="no CE layers"):
        calibrate_ce_model(build(tiny_hf_config(), 0), batches(0, n=1), steps=1)
