"""The HF CE modeling code a Phi-MoE export with CE tables ships (megatron_ce/hf/; standard library only)."""

from megatron_ce.models.registry import CEExport

CE_EXPORT = CEExport(
    model_type="phimoe_ce",
    files=("configuration_phimoe_ce.py", "modeling_phimoe_ce.py", "ce_common.py"),
    architectures=("PhimoeCEForCausalLM",),
    auto_map={
        "AutoConfig": "configuration_phimoe_ce.PhimoeCEConfig",
        "AutoModel": "modeling_phimoe_ce.PhimoeCEModel",
        "AutoModelForCausalLM": "modeling_phimoe_ce.PhimoeCEForCausalLM",
    },
)
