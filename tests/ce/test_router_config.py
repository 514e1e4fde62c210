"""The CE router leaves the model's shared config alone (issue #14 item 5).

With --moe-expert-capacity-factor, CE drops tokens on the main selections after the split, so the
parent router must not drop on the full top-k. The router keeps its own config copy for that; the
config every other module of the model reads (attention, dispatcher, other layers) keeps the factor
at all times, also while the router runs and when it raises."""

import pytest
import torch

from tests.ce.layer_utils import build_moe, ce_config

CF = 0.5


def _capped_layer():
    cfg = ce_config(n=8, k=4, k_a=2, moe_expert_capacity_factor=CF, moe_token_drop_policy="probs")
    return build_moe(cfg), cfg


def _spy_on_routing(layer, shared_cfg, seen, fail=False):
    """Wrap the parent's routing (which reads the capacity factor per call) to record what the shared
    config holds while the router runs."""
    routing = layer.router.routing

    def spy(*args, **kwargs):
        seen.append(shared_cfg.moe_expert_capacity_factor)
        if fail:
            raise RuntimeError("routing failed")
        return routing(*args, **kwargs)

    layer.router.routing = spy


def test_shared_config_keeps_capacity_factor_while_routing(mcore_world1):
    layer, cfg = _capped_layer()
    seen = []
    _spy_on_routing(layer, cfg, seen)
    layer.router.route_ce(torch.randn(12, 32))
    assert seen == [CF], "the shared config's capacity factor changed during routing"
    assert cfg.moe_expert_capacity_factor == CF and layer.config.moe_expert_capacity_factor == CF


def test_shared_config_unchanged_when_routing_raises(mcore_world1):
    layer, cfg = _capped_layer()
    seen = []
    _spy_on_routing(layer, cfg, seen, fail=True)
    with pytest.raises(RuntimeError, match="routing failed"):
        layer.router.route_ce(torch.randn(12, 32))
    assert seen == [CF] and cfg.moe_expert_capacity_factor == CF


def test_capacity_applies_to_main_selections_only(mcore_world1):
    """The router's full top-k routing is dropless; route_ce's main map is capped at
    C = ceil(T * k_m / n * cf) tokens per expert (the formula of tests/ce/test_capacity.py)."""
    layer, _ = _capped_layer()
    x = torch.randn(12, 32)
    _, full_map = layer.router(x)
    assert int(full_map.sum()) == 12 * 4, "the parent dropped tokens on the full top-k"
    _, main_map, aux_idx, _ = layer.router.route_ce(x)
    capacity = -(-12 * 2 * CF // 8)  # ceil(T * k_m / n * cf) = 2 (T = 12, k_m = 2, n = 8)
    assert int(main_map.sum(0).max()) <= capacity < int(main_map.sum())
    assert aux_idx.shape == (12, 2)
