"""Expert capacity (--moe-expert-capacity-factor, token dropping, padding to capacity) with CE.

Capacity applies to the main selections only: each expert keeps at most C = ceil(T * k_disp / n * cf)
of the tokens whose main expert it is (k_disp = k_m, or --moe-ce-max-main under the mass split), the
highest-weight ones; a dropped main selection contributes nothing, and the token's compressed experts
are unchanged. Checked against the independent reference (tests/ce/reference.py), outputs and
gradients, for both dispatchers, both variants, sequential and grouped experts, with and without
padding to capacity, and under the mass split."""

import pytest
import torch

from tests.ce.layer_utils import build_moe, ce_config, randomize
from tests.ce.reference import capacity_keep, main_selections, reference_ce_moe
from tests.ce.test_ce_layer import TOL, max_diff, reference_leaves, run_layer
from tests.ce.test_mass_split import n_main_reference

N, K, D = 8, 4, 32
CF = 0.5  # T=12, k_m=2: C = ceil(12 * 2 / 8 * 0.5) = 2 < the 3 tokens an expert gets on average


def _check(layer, x, grad_out, ref_fn):
    out, _, grads = run_layer(layer, x, grad_out)
    router, w_gate, w_up, w_down, thetas = reference_leaves(layer)
    flat = x.reshape(-1, D).double()
    ref, dropped = ref_fn(flat, router, w_gate, w_up, w_down, thetas)
    assert dropped > 0, "the capacity should drop some main selections"
    ref.backward(grad_out.reshape(-1, D).double())
    assert max_diff(out.reshape(-1, D), ref) <= TOL
    assert max_diff(grads["router.weight"], router.grad) <= TOL
    for name, theta in thetas.items():
        assert max_diff(grads[f"ce.{name}"], theta.grad) <= TOL, name


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
@pytest.mark.parametrize("dispatcher,pad", [("allgather", False), ("alltoall", False), ("alltoall", True)])
@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
def test_fixed_split_capacity_matches_reference(mcore_world1, variant, dispatcher, pad, grouped):
    k_a = 2
    cfg = ce_config(n=N, k=K, k_a=k_a, variant=variant, d=D, dispatcher=dispatcher,
                    moe_expert_capacity_factor=CF, moe_token_drop_policy="probs",
                    moe_pad_expert_input_to_capacity=pad)
    layer = build_moe(cfg, grouped=grouped)
    randomize(layer, seed=5)
    x, grad_out = torch.randn(6, 2, D), 0.1 * torch.randn(6, 2, D)

    def ref(flat, router, w_gate, w_up, w_down, thetas):
        sel = main_selections(flat, router, K, K - k_a)
        keep = capacity_keep(sel, N, CF, per_token=K - k_a)
        y = reference_ce_moe(flat, router, w_gate, w_up, w_down, thetas, K, k_a, variant=variant, keep=keep)
        return y, sum(len(s) for s in sel) - len(keep)

    _check(layer, x, grad_out, ref)


@pytest.mark.parametrize("dispatcher,pad", [("allgather", False), ("alltoall", True)])
def test_mass_split_capacity_matches_reference(mcore_world1, dispatcher, pad):
    tau, cf = 0.75, 0.25  # max_main = 4: C = ceil(12 * 4 / 8 * 0.25) = 2
    cfg = ce_config(n=N, k=K, k_a=0, variant="ia3", d=D, dispatcher=dispatcher, moe_ce_split="mass",
                    moe_ce_main_mass=tau, moe_expert_capacity_factor=cf, moe_pad_expert_input_to_capacity=pad)
    layer = build_moe(cfg)
    randomize(layer, seed=7)
    x, grad_out = torch.randn(6, 2, D), 0.1 * torch.randn(6, 2, D)

    def ref(flat, router, w_gate, w_up, w_down, thetas):
        counts = n_main_reference(flat, router, K, tau, lo=1, hi=K)
        assert len(set(counts)) > 1
        ranked = main_selections(flat, router, K, K)
        keep = capacity_keep([r[:m] for r, m in zip(ranked, counts)], N, cf, per_token=K)
        rows = []
        for t, m in enumerate(counts):  # one token at a time: its own k_m; keep re-indexed to row 0
            kt = {(0, e) for (tt, e) in keep if tt == t}
            rows.append(reference_ce_moe(flat[t:t + 1], router, w_gate, w_up, w_down, thetas, K, K - m, keep=kt))
        return torch.cat(rows), sum(counts) - len(keep)

    _check(layer, x, grad_out, ref)


def test_capacity_large_enough_drops_nothing(mcore_world1):
    """A capacity above every expert's load gives exactly the dropless layer."""
    base = dict(n=N, k=K, k_a=2, d=D, dispatcher="alltoall")
    dropless, capped = build_moe(ce_config(**base)), build_moe(ce_config(**base, moe_expert_capacity_factor=8.0))
    randomize(dropless, seed=3)
    capped.load_state_dict(dropless.state_dict())
    x, grad_out = torch.randn(6, 2, D), 0.1 * torch.randn(6, 2, D)
    a, _, ga = run_layer(dropless, x, grad_out)
    b, _, gb = run_layer(capped, x, grad_out)
    assert torch.equal(a, b)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("capacity_factor,pad", [(None, False), (CF, True)])
def test_dispatcher_buffers_count_main_selections(mcore_world1, capacity_factor, pad):
    """The alltoall dispatcher sizes its output (dropless: T * k; padded: C per expert from T * k) from
    the top-k; only the k_m main selections are dispatched, so it must count those (a fused permute
    would otherwise be told of T * k rows)."""
    cfg = ce_config(n=N, k=K, k_a=2, d=D, dispatcher="alltoall", moe_expert_capacity_factor=capacity_factor,
                    moe_pad_expert_input_to_capacity=pad)
    layer = build_moe(cfg)
    randomize(layer, seed=5)
    run_layer(layer, torch.randn(6, 2, D), torch.randn(6, 2, D))
    td = layer.token_dispatcher
    if pad:
        assert td.capacity == 2  # ceil(12 * k_m / 8 * 0.5), as the router's
    else:
        assert int(td.num_out_tokens) == 12 * 2
