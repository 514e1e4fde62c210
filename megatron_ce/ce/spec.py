"""Turn megatron-core GPT layer specs (local or Transformer-Engine) into CE specs.

Only the MoE pieces are swapped, by type: MoELayer -> CEMoELayer, TopKRouter -> CETopKRouter and each
expert class -> its CE subclass. Everything else in the spec (attention, norms, TE modules) is kept.
"""

import copy

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ce.ce.experts import CE_EXPERTS, CEExpertsMixin
from megatron_ce.ce.layer import CEMoELayer
from megatron_ce.ce.router import CERouterMixin, CETopKRouter


def _ce_moe_spec(moe: ModuleSpec) -> ModuleSpec:
    moe = copy.copy(moe)
    if not issubclass(moe.module, CEMoELayer):
        moe.module = CEMoELayer
    sub = copy.copy(moe.submodules)
    experts = copy.copy(sub.experts)
    if not issubclass(experts.module, CEExpertsMixin):
        if experts.module not in CE_EXPERTS:
            raise TypeError(f"no CE version of expert module {experts.module.__name__}")
        experts.module = CE_EXPERTS[experts.module]
    sub.experts = experts
    if not issubclass(sub.router, CERouterMixin):
        if sub.router is not TopKRouter:
            raise TypeError(f"no CE version of router {sub.router.__name__}; mix in CERouterMixin")
        sub.router = CETopKRouter
    moe.submodules = sub
    return moe


def to_ce_layer_spec(spec):
    """CE version of a TransformerLayer spec, or of a block spec (its `layer_specs`)."""
    spec = copy.copy(spec)
    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules
        spec.layer_specs = [to_ce_layer_spec(s) for s in spec.layer_specs]
        return spec
    sub = copy.copy(spec.submodules)
    mlp = getattr(sub, "mlp", None)
    if _is_moe(mlp):
        sub.mlp = _ce_moe_spec(mlp)
    spec.submodules = sub
    return spec


# mcore's local spec renames the pre-MLP norm's dist-checkpoint keys to where the TE spec keeps that
# norm for a dense MLP: fused into linear_fc1 (TELayerNormColumnParallelLinear.layer_norm_*).
_PRE_MLP_NORM = "pre_mlp_layernorm."


def with_te_checkpoint_keys(spec):
    """A local TransformerLayer spec (or block spec) whose dist-checkpoint keys are those of the
    Transformer-Engine spec, so a checkpoint loads under either --transformer-impl.

    mcore's local spec maps `pre_mlp_layernorm.*` onto `mlp.linear_fc1.layer_norm_*`: right for a
    dense MLP, wrong for an MoE layer, whose TE spec keeps a separate `pre_mlp_layernorm` (TENorm) and
    has no fused fc1 norm. For MoE layers that entry is dropped; `input_layernorm.` ->
    `self_attention.linear_qkv.layer_norm_` stays (the TE spec fuses that norm into linear_qkv).
    Checkpoints written before this fix: megatron_ce/convert/keys.py."""
    spec = copy.copy(spec)
    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules
        spec.layer_specs = [with_te_checkpoint_keys(s) for s in spec.layer_specs]
        return spec
    sub = spec.submodules
    keys_map = getattr(sub, "sharded_state_dict_keys_map", None)
    if not keys_map or not _is_moe(getattr(sub, "mlp", None)):
        return spec
    sub = copy.copy(sub)
    sub.sharded_state_dict_keys_map = {k: v for k, v in keys_map.items() if not k.startswith(_PRE_MLP_NORM)}
    spec.submodules = sub
    return spec


def _is_moe(mlp) -> bool:
    return isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)


def get_gpt_ce_layer_local_spec(**kwargs) -> ModuleSpec:
    """megatron-core's `get_gpt_layer_local_spec(**kwargs)` with CE MoE layers and the TE spec's
    dist-checkpoint keys (`with_te_checkpoint_keys`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return to_ce_layer_spec(with_te_checkpoint_keys(get_gpt_layer_local_spec(**kwargs)))


def get_gpt_ce_layer_te_spec(**kwargs) -> ModuleSpec:
    """megatron-core's Transformer-Engine GPT layer spec with CE MoE layers (needs TE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return to_ce_layer_spec(get_gpt_layer_with_transformer_engine_spec(**kwargs))


def build_ce_moe_layer(config, grouped_gemm: bool = False, pg_collection=None):
    """One standalone CE MoE layer (local spec; legacy GroupedMLP experts when grouped_gemm)."""
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_ce_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=grouped_gemm,
        moe_use_legacy_grouped_gemm=grouped_gemm,
    )
    return build_module(spec.submodules.mlp, config=config, pg_collection=pg_collection)
