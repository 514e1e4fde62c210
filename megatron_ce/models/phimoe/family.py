"""Phi-MoE as one `Family`: builder, conversion table, CE export and presets (registered on import)."""

from megatron_ce.models.phimoe import conversion
from megatron_ce.models.phimoe.export import CE_EXPORT
from megatron_ce.models.phimoe.presets import MODEL_TYPE, PRESETS
from megatron_ce.models.registry import Family, register


def build_model(hf_config, moe_ce_num_compressed=0, moe_ce_variant="ia3", **overrides):
    # imported here: megatron-core loads (with its import-time warnings) only when a model is built
    from megatron_ce.models.phimoe.model import build_phimoe_model

    return build_phimoe_model(
        hf_config, moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant, **overrides
    )



def _build_hf_ce_model(cfg):
    from megatron_ce.models.phimoe.hf_ce import build_hf_ce_model

    return build_hf_ce_model(cfg)

FAMILY = register(
    Family(
        model_type=MODEL_TYPE,
        architectures=("PhimoeForCausalLM",),
        build_model=build_model,
        table=conversion.table,
        ce=conversion.CE_TABLES,
        hf_aliases=conversion.HF_ALIASES,
        fused_experts=conversion.FUSED_EXPERTS,
        hf_ignore=conversion.HF_IGNORE,
        ce_export=CE_EXPORT,
        presets=PRESETS,
        build_hf_ce_model=_build_hf_ce_model,
    )
)
