"""Phi-MoE (microsoft/Phi-3.5-MoE-*) on megatron-core, with or without Compressed Experts.

    config.py      HF config -> PhimoeTransformerConfig (field table), model kwargs, config checks
    longrope.py    LongRoPE parameters and inverse frequencies (as the pinned transformers computes them)
    router.py      the top-2 sparsemixer and SparseMixerRouter (a megatron-core TopKRouter)
    model.py       PhimoeSelfAttention (LongRoPE mscale), o_proj bias, input jitter, layer spec,
                   PhimoeGPTModel (lm_head bias), build_phimoe_model
    conversion.py  HF <-> megatron-core name table and CE table names
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
    "PhimoeTransformerConfig": "config",
    "check_phimoe_config": "config",
    "phimoe_transformer_config": "config",
    "phimoe_model_kwargs": "config",
    "longrope_params": "longrope",
    "longrope_inv_freq": "longrope",
    "SparseMixerMultiplier": "router",
    "sparsemixer": "router",
    "SparseMixerRouter": "router",
    "PhimoeSelfAttention": "model",
    "with_bias": "model",
    "JitteredPreMoENorm": "model",
    "phimoe_layer_spec": "model",
    "PhimoeGPTModel": "model",
    "build_phimoe_model": "model",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
