"""to_ce_layer_spec refuses a spec with no MoE layer (issue #14 item 5): CE asked for on a dense model
would otherwise build a model without compressed experts and say nothing."""

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_ce import compat
from megatron_ce.ce import CEMoELayer, ConfigError, get_gpt_ce_layer_local_spec, to_ce_layer_spec


def _mlp_class(layer_spec):
    return compat.spec_class(layer_spec.submodules.mlp)


def test_dense_layer_spec_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        to_ce_layer_spec(get_gpt_layer_local_spec(num_experts=None))
    assert "MoE" in str(info.value) and "\n" not in str(info.value)


def test_dense_block_spec_is_refused():
    dense = get_gpt_layer_local_spec(num_experts=None)
    with pytest.raises(ConfigError, match="MoE"):
        to_ce_layer_spec(TransformerBlockSubmodules(layer_specs=[dense, dense]))


def test_block_with_some_moe_layers_converts_those_only():
    dense, moe = get_gpt_layer_local_spec(num_experts=None), get_gpt_layer_local_spec(num_experts=4)
    block = to_ce_layer_spec(TransformerBlockSubmodules(layer_specs=[dense, moe]))
    assert _mlp_class(block.layer_specs[0]) is _mlp_class(dense)
    assert issubclass(_mlp_class(block.layer_specs[1]), CEMoELayer)


def test_dense_model_from_flags_still_gets_its_plain_spec():
    """get_gpt_ce_layer_local_spec serves dense models too (the trainer's flag-built models)."""
    spec = get_gpt_ce_layer_local_spec(num_experts=None)
    assert _mlp_class(spec) is _mlp_class(get_gpt_layer_local_spec(num_experts=None))
