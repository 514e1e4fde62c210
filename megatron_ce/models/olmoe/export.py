"""The HF CE modeling code an OLMoE export with CE tables ships (megatron_ce/hf/; standard library only)."""

from megatron_ce.models.registry import CEExport

CE_EXPORT = CEExport(
    model_type="olmoe_ce",
    files=("configuration_olmoe_ce.py", "modeling_olmoe_ce.py", "ce_common.py"),
    architectures=("OlmoeCEForCausalLM",),
    auto_map={
        "AutoConfig": "configuration_olmoe_ce.OlmoeCEConfig",
        "AutoModel": "modeling_olmoe_ce.OlmoeCEModel",
        "AutoModelForCausalLM": "modeling_olmoe_ce.OlmoeCEForCausalLM",
    },
)
