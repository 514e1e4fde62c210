"""Turn megatron-core GPT layer specs (local or Transformer-Engine) into CE specs.

Only the MoE pieces are swapped, by type: MoELayer -> CEMoELayer, TopKRouter -> CETopKRouter and each
expert class -> its CE subclass. Everything else in the spec (attention, norms, TE modules) is kept.
"""

import copy

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ce import compat
from megatron_ce.ce.config import ConfigError
from megatron_ce.ce.experts import CE_EXPERTS, CEExpertsMixin, torch_grouped_experts_spec
from megatron_ce.ce.layer import CEMoELayer
from megatron_ce.ce.router import CERouterMixin, CETopKRouter


def _ce_moe_spec(moe):
    """CE version of an MoE layer spec (a ModuleSpec, or a functools.partial since megatron-core 0.18:
    compat.replace_spec keeps the kind)."""
    layer_cls = compat.spec_class(moe)
    sub = copy.copy(compat.spec_submodules(moe))
    experts_cls = compat.spec_class(sub.experts)
    if experts_cls is None:
        raise TypeError(f"cannot read the expert class of MoE spec {sub.experts!r}")
    if not issubclass(experts_cls, CEExpertsMixin):
        if experts_cls not in CE_EXPERTS:
            raise TypeError(f"no CE version of expert module {experts_cls.__name__}")
        sub.experts = compat.replace_spec(sub.experts, module=CE_EXPERTS[experts_cls])
    if not issubclass(sub.router, CERouterMixin):
        if sub.router is not TopKRouter:
            raise TypeError(f"no CE version of router {sub.router.__name__}; mix in CERouterMixin")
        sub.router = CETopKRouter
    return compat.replace_spec(moe, module=None if issubclass(layer_cls, CEMoELayer) else CEMoELayer, submodules=sub)


def to_ce_layer_spec(spec):
    """CE version of a TransformerLayer spec, or of a block spec (its `layer_specs`). Dense layers of a
    block with MoE layers stay as they are; a spec without any MoE layer is refused (CE would
    silently do nothing)."""
    ce_spec, num_moe = _to_ce(spec)
    if num_moe == 0:
        raise ConfigError("CE needs MoE layers, and the layer spec has none (--num-experts not set?)")
    return ce_spec


def _to_ce(spec):
    """(CE version of spec, how many MoE layers it has)."""
    spec = copy.copy(spec)
    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules
        converted = [_to_ce(s) for s in spec.layer_specs]
        spec.layer_specs = [s for s, _ in converted]
        return spec, sum(n for _, n in converted)
    sub = copy.copy(spec.submodules)
    mlp = getattr(sub, "mlp", None)
    if not _is_moe(mlp):
        return spec, 0
    sub.mlp = _ce_moe_spec(mlp)
    spec.submodules = sub
    return spec, 1


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
    cls = compat.spec_class(mlp) if mlp is not None else None
    return cls is not None and issubclass(cls, MoELayer)


def get_gpt_ce_layer_local_spec(**kwargs) -> ModuleSpec:
    """megatron-core's `get_gpt_layer_local_spec(**kwargs)` with CE MoE layers (when num_experts is set)
    and the TE spec's dist-checkpoint keys (`with_te_checkpoint_keys`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = with_te_checkpoint_keys(get_gpt_layer_local_spec(**kwargs))
    return to_ce_layer_spec(spec) if kwargs.get("num_experts") else spec  # dense: nothing to convert


def get_gpt_ce_layer_te_spec(**kwargs) -> ModuleSpec:
    """megatron-core's Transformer-Engine GPT layer spec with CE MoE layers when num_experts is set
    (needs TE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    spec = get_gpt_layer_with_transformer_engine_spec(**kwargs)
    return to_ce_layer_spec(spec) if kwargs.get("num_experts") else spec  # dense: nothing to convert


def build_ce_moe_layer(config, grouped_gemm: bool = False, pg_collection=None, torch_grouped: bool = False,
                       ce: bool = True):
    """One standalone MoE layer from the local spec, a CE layer unless ce=False (megatron-core's own).

    grouped_gemm: megatron-core's legacy grouped experts (grouped_gemm package), which only releases <0.17
    have (compat.legacy_grouped_gemm_kwargs refuses it on later ones; their CE class:
    megatron_ce/legacy_grouped_mlp.py). torch_grouped: TEGroupedMLP on TorchGroupedLinear (any release,
    no Transformer Engine needed)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=grouped_gemm,
        **compat.legacy_grouped_gemm_kwargs(grouped_gemm),
    )
    mlp = spec.submodules.mlp
    if torch_grouped:
        sub = copy.copy(compat.spec_submodules(mlp))
        sub.experts = torch_grouped_experts_spec(ce=False)
        mlp = compat.replace_spec(mlp, submodules=sub)
    if ce:
        mlp = _ce_moe_spec(mlp)
    return compat.build_spec(mlp, config=config, pg_collection=pg_collection)
