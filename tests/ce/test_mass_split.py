"""Adaptive main/compressed split per token (--moe-ce-split mass)."""

import pytest
import torch

from megatron_ce.ce import CETransformerConfig, ConfigError
from tests.ce.layer_utils import build_moe, ce_config, randomize
from tests.ce.reference import reference_ce_moe
from tests.ce.test_ce_layer import TOL, max_diff, reference_leaves, run_layer
from tests.ce.test_config_errors import GOOD


def mass_config(tau, n=8, k=4, variant="ia3", **kw):
    return ce_config(n=n, k=k, k_a=0, variant=variant, moe_ce_split="mass", moe_ce_main_mass=tau, **kw)


def n_main_reference(x, router_weight, k, tau, lo, hi):
    """Independent count: shortest prefix of the descending top-k softmax probs with share >= tau."""
    probs = torch.softmax(x.double() @ router_weight.double().t(), dim=-1)
    top = torch.sort(probs, dim=-1, descending=True).values[:, :k]
    counts = []
    for row in top:
        share, m = 0.0, 0
        while m < k and (m == 0 or share < tau * row.sum().item()):
            share += row[m].item()
            m += 1
        counts.append(min(max(m, lo), hi))
    return counts


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
@pytest.mark.parametrize("tau", [0.55, 0.75, 0.9])
def test_mass_split_matches_per_token_reference(mcore_world1, variant, tau):
    layer = build_moe(mass_config(tau, variant=variant))
    randomize(layer, seed=11)
    x = torch.randn(6, 2, 32)
    grad_out = 0.1 * torch.randn(6, 2, 32)
    out, _, grads = run_layer(layer, x, grad_out)
    router, w_gate, w_up, w_down, thetas = reference_leaves(layer)
    flat = x.reshape(-1, 32).double()
    counts = n_main_reference(flat, router, 4, tau, lo=1, hi=4)
    assert len(set(counts)) > 1, "tau should give tokens different numbers of main experts"
    ref = torch.cat([
        reference_ce_moe(flat[t : t + 1], router, w_gate, w_up, w_down, thetas, 4, 4 - m,
                         variant=variant)
        for t, m in enumerate(counts)
    ])
    ref.backward(grad_out.reshape(-1, 32).double())
    assert max_diff(out.reshape(-1, 32), ref) <= TOL
    assert max_diff(grads["router.weight"], router.grad) <= TOL
    for name, theta in thetas.items():
        assert max_diff(grads[f"ce.{name}"], theta.grad) <= TOL, name


def test_tau_one_is_the_unmodified_moe_layer(mcore_world1):
    ce = build_moe(mass_config(1.0))
    plain = build_moe(ce_config(n=8, k=4, k_a=0), ce=False)
    randomize(plain, seed=4)
    ce.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for p in ce.ce.parameters():
            p.uniform_(0.5, 1.5)  # irrelevant: every top-k expert runs as a main expert
    x, g = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    out_ce, xg_ce, grads_ce = run_layer(ce, x, g)
    out_plain, xg_plain, grads_plain = run_layer(plain, x, g)
    assert max_diff(out_ce, out_plain) <= TOL and max_diff(xg_ce, xg_plain) <= TOL
    assert max_diff(grads_ce["router.weight"], grads_plain["router.weight"]) <= TOL
    assert all(g.abs().max() == 0 for n, g in grads_ce.items() if n.startswith("ce."))


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_tau_zero_is_top1_plus_ce(mcore_world1, variant):
    mass = build_moe(mass_config(0.0, variant=variant))
    fixed = build_moe(ce_config(n=8, k=4, k_a=3, variant=variant))
    randomize(fixed, seed=6)
    mass.load_state_dict(fixed.state_dict())
    x, g = torch.randn(5, 2, 32), 0.1 * torch.randn(5, 2, 32)
    out_m, xg_m, grads_m = run_layer(mass, x, g)
    out_f, xg_f, grads_f = run_layer(fixed, x, g)
    assert max_diff(out_m, out_f) <= TOL and max_diff(xg_m, xg_f) <= TOL
    assert all(max_diff(grads_m[n], grads_f[n]) <= TOL for n in grads_f)


@pytest.mark.parametrize("lo,hi", [(1, 4), (2, 3), (2, 2)])
def test_min_max_bounds(mcore_world1, lo, hi):
    cfg = mass_config(0.5, moe_ce_min_main=lo, moe_ce_max_main=hi)
    assert cfg.moe_ce_num_compressed == 4 - lo
    layer = build_moe(cfg)
    randomize(layer, seed=8)
    x = torch.randn(64, 1, 32)
    with torch.no_grad():
        _, main_map, aux_idx, aux_w = layer.router.route_ce(x)
    n_main = main_map.sum(-1)
    assert int(n_main.min()) >= lo and int(n_main.max()) <= hi
    expected = torch.tensor(n_main_reference(x.reshape(-1, 32), layer.router.weight, 4, 0.5, lo, hi))
    assert torch.equal(n_main, expected)
    # weights: sum 1 over the compressed slots that are used, 0 for tokens with none
    n_aux = 4 - n_main
    assert torch.allclose(aux_w.sum(-1), (n_aux > 0).to(aux_w.dtype))
    assert torch.equal((aux_w > 0).sum(-1), n_aux)


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(moe_ce_split="adaptive"), "--moe-ce-split='adaptive' is unknown"),
        (dict(moe_ce_split="mass", moe_ce_main_mass=1.5), "--moe-ce-main-mass=1.5 must be in [0, 1]"),
        (dict(moe_ce_split="mass", moe_ce_num_compressed=0, moe_ce_min_main=4),
         "--moe-ce-min-main=4 must be >= 1 and < --moe-router-topk=4"),
        (dict(moe_ce_split="mass", moe_ce_num_compressed=0, moe_ce_min_main=3, moe_ce_max_main=2),
         "--moe-ce-max-main=2 must be >= --moe-ce-min-main=3"),
        (dict(moe_ce_split="mass", moe_ce_num_compressed=2, moe_ce_min_main=1),
         "--moe-ce-num-compressed=2 must equal --moe-router-topk - --moe-ce-min-main = 3"),
    ],
)
def test_mass_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        CETransformerConfig(**{**GOOD, **override})
    assert str(err.value).startswith(message), str(err.value)
