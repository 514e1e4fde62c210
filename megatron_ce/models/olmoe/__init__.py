"""OLMoE (allenai/OLMoE-*) on megatron-core, with or without Compressed Experts.

    config.py      HF config -> CETransformerConfig (field table), GPTModel kwargs, config checks
    qk_norm.py     FullWidthRMSNorm: OLMoE's QK-norm over all heads, TP-aware
    model.py       OlmoeSelfAttention (clip_qkv), layer spec, build_olmoe_model
    conversion.py  HF <-> megatron-core name table, CE table names, the reference `ces` format
    export.py      the HF CE modeling code an export ships (standard library only)
    presets.py     released config, launch-plan preset, benchmark shapes (standard library only)
    family.py      all of it as the registered `Family` (megatron_ce.models.registry)

The names below load on first use, so that importing `presets` or `export` (launch/plan.py, login
nodes) does not import torch.
"""

from megatron_ce.models.lazy import lazy_exports

_LAZY = {
    "MODEL_TYPE": "config",
    "FIELDS": "config",
    "check_olmoe_config": "config",
    "olmoe_transformer_config": "config",
    "olmoe_model_kwargs": "config",
    "FullWidthRMSNorm": "qk_norm",
    "OlmoeSelfAttention": "model",
    "olmoe_layer_spec": "model",
    "build_olmoe_model": "model",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
