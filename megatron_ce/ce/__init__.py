"""Compressed Experts on megatron-core: config, router, layer, experts and layer specs."""

from megatron_ce.ce.config import CE_VARIANTS, CETransformerConfig, ConfigError
# CEGroupedMLP is None on megatron-core >= 0.17 (no legacy GroupedMLP; megatron_ce/compat.py).
from megatron_ce.ce.experts import (
    CEGroupedMLP,
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
    "CEGroupedMLP",
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
