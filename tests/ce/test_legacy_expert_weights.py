"""Calibration's per-expert weight vectors (calibrate/metrics.local_expert_weights) for megatron-core
<0.17's legacy GroupedMLP, whose reading lives in megatron_ce/legacy_grouped_mlp.py: each vector holds
exactly one expert's fc1 and fc2 weights, as for SequentialMLP."""

import pytest
import torch

from megatron_ce import compat
from megatron_ce.calibrate.metrics import local_expert_weights
from tests.ce.layer_utils import build_moe, ce_config, expert_weights, randomize

pytestmark = pytest.mark.skipif(not compat.HAS_LEGACY_GROUPED_MLP,
                                reason=f"legacy GroupedMLP: megatron-core <0.17 only, found {compat.MCORE_VERSION_STR}")


def _gram(vectors):
    v = torch.stack([x.double() for x in vectors])
    return v @ v.t()


def test_grouped_mlp_vectors_are_one_expert_each(mcore_world1):
    n, d, ffn = 8, 32, 48
    layer = build_moe(ce_config(n=n, d=d, ffn=ffn), grouped=True)
    assert isinstance(layer.experts, compat.GroupedMLP)
    randomize(layer, seed=3)
    vecs = local_expert_weights(layer.experts)
    assert len(vecs) == n and all(v.dtype == torch.float32 and v.numel() == 3 * d * ffn for v in vecs)

    # Independent read of the same experts (tests/ce/layer_utils, from GroupedMLP's documented layout):
    # the vectors may order an expert's entries differently, but every inner product between experts
    # (what expert similarity uses) and each expert's multiset of entries must be the same.
    w_gate, w_up, w_down = expert_weights(layer)
    ref = [torch.cat([w_gate[e].reshape(-1), w_up[e].reshape(-1), w_down[e].reshape(-1)]).detach().float()
           for e in range(n)]
    torch.testing.assert_close(_gram(vecs), _gram(ref), rtol=1e-12, atol=1e-12)
    for v, r in zip(vecs, ref):
        assert torch.equal(v.sort().values, r.sort().values)


def test_other_experts_are_not_read_as_legacy(mcore_world1):
    from megatron_ce.ce import build_ce_moe_layer

    legacy = compat.legacy_grouped_mlp()
    sequential = build_moe(ce_config(), grouped=False).experts
    torch_grouped = build_ce_moe_layer(ce_config(), torch_grouped=True).experts  # TEGroupedMLP, not legacy
    assert legacy.expert_weight_vectors(sequential) is None
    assert legacy.expert_weight_vectors(torch_grouped) is None
    assert legacy.expert_weight_vectors(build_moe(ce_config(), grouped=True).experts) is not None
