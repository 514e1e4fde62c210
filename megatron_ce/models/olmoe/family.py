"""OLMoE as one `Family`: builder, conversion table, CE export and presets (registered on import)."""

from megatron_ce.models.olmoe import conversion
from megatron_ce.models.olmoe.export import CE_EXPORT
from megatron_ce.models.olmoe.presets import MODEL_TYPE, PRESETS
from megatron_ce.models.registry import Family, register


def build_model(hf_config, moe_ce_num_compressed=0, moe_ce_variant="ia3", **overrides):
    # imported here: megatron-core loads (with its import-time warnings) only when a model is built
    from megatron_ce.models.olmoe.model import build_olmoe_model

    return build_olmoe_model(
        hf_config, moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant, **overrides
    )



def _build_hf_ce_model(cfg):
    from megatron_ce.models.olmoe.hf_ce import build_hf_ce_model

    return build_hf_ce_model(cfg)

FAMILY = register(
    Family(
        model_type=MODEL_TYPE,
        architectures=("OlmoeForCausalLM",),
        build_model=build_model,
        table=conversion.table,
        ce=conversion.CE_TABLES,
        fused_experts=conversion.FUSED_EXPERTS,
        hf_ignore=conversion.HF_IGNORE,
        ce_export=CE_EXPORT,
        presets=PRESETS,
        build_hf_ce_model=_build_hf_ce_model,
    )
)
