"""Grouped experts without Transformer Engine (TEGroupedMLP on megatron_ce's TorchGroupedLinear): the
grouped code path CPU tests can run on every supported megatron-core (the legacy GroupedMLP went in
0.17). Same numerics as the sequential experts, which tests/ce/test_ce_layer.py checks against the
plain-torch reference."""

import pytest
import torch

from megatron_ce.ce import build_ce_moe_layer
from megatron_ce.ce.experts import CETEGroupedMLP, TorchGroupedLinear
from tests.ce.layer_utils import ce_config, randomize

TOL = 1e-6  # fp32; outputs and grads are O(0.1-1) (randomize)


def _grouped_name(name):
    """Sequential parameter name -> the grouped one (experts.local_experts.{i}.linear_fcX.weight ->
    experts.linear_fcX.weight{i}); other names are shared."""
    parts = name.split(".")
    if parts[:2] != ["experts", "local_experts"]:
        return name
    return f"experts.{parts[3]}.{parts[4]}{parts[2]}"


def _copy_sequential_into_grouped(seq, grp):
    grouped = dict(grp.named_parameters())
    names = [n for n, _ in seq.named_parameters()]
    assert sorted(_grouped_name(n) for n in names) == sorted(grouped), "layouts differ"
    with torch.no_grad():
        for name, p in seq.named_parameters():
            grouped[_grouped_name(name)].copy_(p)


def _run(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, bias = layer(x)
    assert bias is None
    out.backward(grad_out)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def _diff(a, b):
    return (a.double() - b.double()).abs().max().item()


CASES = [(v, k_a, False, fusion) for v, k_a in [("ia3", 1), ("ia3", 2), ("hidden", 2), ("ia3", 0)] for fusion in (False, True)]
# Expert biases only where the CE path runs the experts: megatron-core's own sequential MLP with a bias
# fails its backward in this CPU set-up (in-place add on a view), and its TEGroupedMLP has no bias +
# SwiGLU-fusion path.
CASES += [("ia3", 1, True, False), ("ia3", 2, True, False)]


@pytest.mark.parametrize("variant,k_a,bias,fusion", CASES)
def test_torch_grouped_equals_sequential(mcore_world1, variant, k_a, bias, fusion):
    cfg = ce_config(n=8, k=4, k_a=k_a, variant=variant, add_bias_linear=bias, bias_activation_fusion=fusion)
    seq, grp = build_ce_moe_layer(cfg), build_ce_moe_layer(cfg, torch_grouped=True)
    assert isinstance(grp.experts, CETEGroupedMLP) and isinstance(grp.experts.linear_fc1, TorchGroupedLinear)
    randomize(seq, seed=11)
    _copy_sequential_into_grouped(seq, grp)
    x, grad_out = torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    out_s, xg_s, g_s = _run(seq, x, grad_out)
    out_g, xg_g, g_g = _run(grp, x, grad_out)
    assert _diff(out_s, out_g) <= TOL and _diff(xg_s, xg_g) <= TOL
    for name, g in g_s.items():
        assert _diff(g, g_g[_grouped_name(name)]) <= TOL, name


def test_torch_grouped_without_ce_is_mcore_te_grouped_mlp_bitwise(mcore_world1):
    """k_a = 0: the CE layer runs megatron-core's own TEGroupedMLP forward, bit for bit."""
    cfg = ce_config(n=8, k=2, k_a=0)
    ours, theirs = build_ce_moe_layer(cfg, torch_grouped=True), build_ce_moe_layer(cfg, torch_grouped=True, ce=False)
    assert type(theirs).__name__ == "MoELayer" and type(theirs.experts).__name__ == "TEGroupedMLP"
    randomize(theirs, seed=3)
    ours.load_state_dict(theirs.state_dict())
    x, grad_out = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    out_a, xg_a, g_a = _run(ours, x, grad_out)
    out_b, xg_b, g_b = _run(theirs, x, grad_out)
    assert torch.equal(out_a, out_b) and torch.equal(xg_a, xg_b)
    assert g_a.keys() == g_b.keys() and all(torch.equal(g_a[k], g_b[k]) for k in g_a)


def test_torch_grouped_linear_matches_per_expert_matmul():
    """Independent of megatron-core: y_e = x_e W_e^T (+ b_e), rows split by m_splits; bias returned
    separately with skip_bias_add."""
    cfg = ce_config()
    lin = TorchGroupedLinear(3, 4, 5, config=cfg, init_method=torch.nn.init.normal_, bias=True, skip_bias_add=False)
    with torch.no_grad():
        for i in range(3):
            getattr(lin, f"bias{i}").normal_()
    x, splits = torch.randn(6, 4), [2, 0, 4]
    y, b = lin(x, splits)
    ws, bs = [getattr(lin, f"weight{i}") for i in range(3)], [getattr(lin, f"bias{i}") for i in range(3)]
    expect = torch.cat([x[:2] @ ws[0].t() + bs[0], x[2:] @ ws[2].t() + bs[2]])
    assert b is None and torch.allclose(y, expect, atol=1e-6)
    lin.skip_bias_add = True
    y2, b2 = lin(x, splits)
    assert torch.allclose(y2, torch.cat([x[:2] @ ws[0].t(), x[2:] @ ws[2].t()]), atol=1e-6) and b2 == bs
