"""CE MoE layer on one rank against the independent plain-torch reference (tests/ce/reference.py)."""

import pytest
import torch

from megatron_ce import compat
from tests.ce.layer_utils import build_moe, ce_config, expert_weights, randomize, thetas_of
from tests.ce.reference import reference_ce_moe, reference_topk_main_only

TOL = 1e-6  # max abs diff, fp32, outputs and grads are O(0.1-1) by construction (randomize)


def run_layer(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out, bias = layer(x)
    assert bias is None
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def reference_leaves(layer):
    """The layer's weights as fp64 leaf tensors in the reference layout."""
    w_gate, w_up, w_down = (w.detach().double().requires_grad_(True) for w in expert_weights(layer))
    router = layer.router.weight.detach().double().requires_grad_(True)
    thetas = {k: v.detach().double().requires_grad_(True) for k, v in thetas_of(layer).items()}
    return router, w_gate, w_up, w_down, thetas


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


CASES = [(8, 2, 1), (16, 8, 4)]


@pytest.mark.parametrize("n,k,k_a", CASES)
@pytest.mark.parametrize("variant", ["ia3", "hidden"])
@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_ce_layer_matches_reference(mcore_world1, n, k, k_a, variant, grouped, dispatcher):
    torch.manual_seed(0)
    layer = build_moe(ce_config(n=n, k=k, k_a=k_a, variant=variant, dispatcher=dispatcher), grouped)
    randomize(layer, seed=n + k)
    x = torch.randn(6, 3, 32)
    grad_out = 0.1 * torch.randn(6, 3, 32)  # grads O(0.1-1): fp32 rounding stays far below TOL
    out, x_grad, grads = run_layer(layer, x, grad_out)

    router, w_gate, w_up, w_down, thetas = reference_leaves(layer)
    xr = x.reshape(-1, 32).double().requires_grad_(True)
    ref = reference_ce_moe(xr, router, w_gate, w_up, w_down, thetas, k, k_a, variant=variant)
    ref.backward(grad_out.reshape(-1, 32).double())

    assert out.abs().max() > 0.1, "outputs too small for the tolerance to mean anything"
    assert max_diff(out.reshape(-1, 32), ref) <= TOL
    assert max_diff(x_grad.reshape(-1, 32), xr.grad) <= TOL
    assert max_diff(grads["router.weight"], router.grad) <= TOL
    got_g, got_u, got_d = _expert_grads(layer)
    assert max_diff(got_g, w_gate.grad) <= TOL
    assert max_diff(got_u, w_up.grad) <= TOL
    assert max_diff(got_d, w_down.grad) <= TOL
    for name, ref_theta in thetas.items():
        assert ref_theta.grad.abs().max() > 0, f"theta {name} got no reference gradient"
        assert max_diff(grads[f"ce.{name}"], ref_theta.grad) <= TOL, name


def _expert_grads(layer):
    """Expert grads in the reference layout (same views as expert_weights, applied to .grad)."""
    saved = {}
    for name, p in layer.experts.named_parameters():
        saved[name] = p.data
        p.data = p.grad
    try:
        return [w.detach().clone() for w in expert_weights(layer)]
    finally:
        for name, p in layer.experts.named_parameters():
            p.data = saved[name]


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
def test_k_a_zero_is_mcore_moe_layer_bitwise(mcore_world1, grouped):
    cfg = ce_config(n=8, k=2, k_a=0, bf16=grouped)  # mcore's GroupedMLP only runs with bf16=True
    ours, theirs = build_moe(cfg, grouped, ce=True), build_moe(cfg, grouped, ce=False)
    assert type(theirs).__name__ == "MoELayer" and type(ours).__name__ == "CEMoELayer"
    randomize(theirs, seed=3)
    ours.load_state_dict(theirs.state_dict())
    x, grad_out = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    out_a, xg_a, g_a = run_layer(ours, x, grad_out)
    out_b, xg_b, g_b = run_layer(theirs, x, grad_out)
    assert torch.equal(out_a, out_b) and torch.equal(xg_a, xg_b)
    assert g_a.keys() == g_b.keys()
    assert all(torch.equal(g_a[k], g_b[k]) for k in g_a)


@pytest.mark.parametrize("n,k,k_a", CASES)
@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_unit_theta_is_plain_top_k_main(mcore_world1, n, k, k_a, variant):
    layer = build_moe(ce_config(n=n, k=k, k_a=k_a, variant=variant))
    randomize(layer, seed=1)
    layer.ce.reset_parameters()
    x = torch.randn(4, 2, 32)
    out, _, _ = run_layer(layer, x, torch.ones(4, 2, 32))
    router, w_gate, w_up, w_down, _ = reference_leaves(layer)
    ref = reference_topk_main_only(x.reshape(-1, 32).double(), router, w_gate, w_up, w_down, k, k - k_a)
    assert max_diff(out.reshape(-1, 32), ref) <= TOL


def test_theta_grads_only_through_aux_experts(mcore_world1):
    """An expert that is never an auxiliary choice gets exactly zero theta gradient."""
    layer = build_moe(ce_config(n=8, k=2, k_a=1))
    randomize(layer, seed=2)
    x = torch.randn(3, 1, 32)
    _, _, grads = run_layer(layer, x, torch.randn(3, 1, 32))
    with torch.no_grad():
        _, _, aux_idx, _ = layer.router.route_ce(x)
    used = set(aux_idx.flatten().tolist())
    for e in range(8):
        nonzero = grads["ce.gate"][e].abs().sum() > 0
        assert bool(nonzero) == (e in used), e


@pytest.mark.skipif(not compat.HAS_LEGACY_GROUPED_MLP, reason="legacy GroupedMLP layout (megatron-core <0.17); "
                    "tests/ce/test_torch_grouped_experts.py covers grouped experts on every release")
@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_grouped_equals_sequential(mcore_world1, variant):
    cfg = ce_config(n=8, k=4, k_a=2, variant=variant)
    seq, grp = build_moe(cfg, grouped=False), build_moe(cfg, grouped=True)
    randomize(seq, seed=5)
    w_gate, w_up, w_down = expert_weights(seq)
    with torch.no_grad():
        grp.router.weight.copy_(seq.router.weight)
        for name, p in grp.ce.named_parameters():
            p.copy_(getattr(seq.ce, name))
        n, d = 8, 32  # GroupedMLP stores per-expert [d, 2F] (gate|up) and [F, d] blocks
        grp.experts.weight1.view(n, d, -1).copy_(torch.cat([w_gate, w_up], 1).transpose(1, 2))
        grp.experts.weight2.view(n, -1, d).copy_(w_down.transpose(1, 2))
    x, grad_out = torch.randn(6, 2, 32), torch.randn(6, 2, 32)
    out_s, xg_s, g_s = run_layer(seq, x, grad_out)
    out_g, xg_g, g_g = run_layer(grp, x, grad_out)
    assert max_diff(out_s, out_g) <= TOL and max_diff(xg_s, xg_g) <= TOL
    for name in ("router.weight", *[f"ce.{t}" for t in thetas_of(seq)]):
        assert max_diff(g_s[name], g_g[name]) <= TOL, name
