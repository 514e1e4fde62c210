"""Compressed Experts on megatron-core: config, router, layer, experts and layer specs."""

from megatron_ce.ce.config import CE_VARIANTS, CETransformerConfig, ConfigError
# The CE experts of megatron-core <0.17's legacy grouped experts: megatron_ce/legacy_grouped_mlp.py.
from megatron_ce.ce.experts import (
    CESequentialMLP,
    CETEGroupedMLP,
    TorchGroupedLinear,
    torch_grouped_experts_spec,
)
from megatron_ce.ce.layer import CEMoELayer, CompressedExperts
from megatron_ce.ce.router import CERouterMixin, CETopKRouter
from megatron_ce.ce.spec import (
    build_ce_moe_layer,
    get_gpt_ce_layer_local_spec,
    get_gpt_ce_layer_te_spec,
    to_ce_layer_spec,
)

__all__ = [
    "build_ce_moe_layer",
    "CE_VARIANTS",
    "CETransformerConfig",
    "ConfigError",
    "CESequentialMLP",
    "CETEGroupedMLP",
    "TorchGroupedLinear",
    "torch_grouped_experts_spec",
    "CEMoELayer",
    "CompressedExperts",
    "CERouterMixin",
    "CETopKRouter",
    "get_gpt_ce_layer_local_spec",
    "get_gpt_ce_layer_te_spec",
    "to_ce_layer_spec",
]
