"""Phi-MoE HF config -> PhimoeTransformerConfig (a field table) and PhimoeGPTModel keyword arguments.

From an HF `PhimoeConfig` (object, dict or config.json; transformers 4.x `rope_scaling` or 5.x
`rope_parameters`) this builds
- `phimoe_transformer_config`: a `PhimoeTransformerConfig` (a CETransformerConfig carrying the
  sparsemixer / jitter / lm_head-bias fields): LayerNorm with bias (eps = `rms_norm_eps`), q/k/v bias
  (`add_qkv_bias = attention_bias`), `add_bias_linear=False` (so neither the experts nor the router
  get biases), SwiGLU experts w2(silu(w1 x) * w3 x), GQA, no QK-norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from megatron_ce.ce import CETransformerConfig
from megatron_ce.ce.config import ConfigError
from megatron_ce.models.common import HFConfigLike, hf_config_dict, require, rope_theta
from megatron_ce.models.config_table import (
    COMMON_FIELDS,
    aux_loss_coeff,
    config_kwargs,
    const,
    head_dim,
    hf,
)
from megatron_ce.models.phimoe.longrope import longrope_params
from megatron_ce.models.phimoe.presets import MODEL_TYPE

NAME = "Phi-MoE"  # in error messages


@dataclass
class PhimoeTransformerConfig(CETransformerConfig):
    """CETransformerConfig + the Phi-MoE fields megatron-core has no place for."""

    # sparsemixer threshold eps (HF `router_jitter_noise`): experts with (max-s)/max(|s|,max) > 2 eps
    # are masked for a pick.
    sparsemixer_eps: float = 0.01
    # HF `input_jitter_noise`: training-time U(1-eps, 1+eps) scaling of the MoE block input.
    phimoe_input_jitter_noise: float = 0.0
    # HF `lm_head_bias`.
    phimoe_lm_head_bias: bool = False


FIELDS = COMMON_FIELDS + (
    hf("num_moe_experts", "num_local_experts"),
    const("moe_router_topk", 2),  # the sparsemixer (check_phimoe_config: num_experts_per_tok == 2)
    # used only by the load-balancing loss (HF: softmax over all experts, top-k of it)
    const("moe_router_pre_softmax", False),
    const("moe_router_dtype", None),  # router in the activation dtype, like HF's nn.Linear gate
    aux_loss_coeff(0.001),
    const("normalization", "LayerNorm"),
    hf("add_qkv_bias", "attention_bias", False, bool),  # o_proj bias too: from the spec (model.py)
    hf("sparsemixer_eps", "router_jitter_noise", 0.01, float),
    hf("phimoe_input_jitter_noise", "input_jitter_noise", 0.0, float),
    hf("phimoe_lm_head_bias", "lm_head_bias", False, bool),
)


def check_phimoe_config(cfg: Dict[str, Any]) -> None:
    """Errors for Phi-MoE config values this implementation does not cover."""
    mt = cfg.get("model_type", MODEL_TYPE)
    if mt != MODEL_TYPE:
        raise ConfigError(f"config model_type={mt!r} is not {MODEL_TYPE!r}")
    if cfg.get("tie_word_embeddings"):
        raise ConfigError("Phi-MoE with tie_word_embeddings=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Phi-MoE hidden_act={cfg['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if int(cfg.get("num_experts_per_tok", 2)) != 2:
        raise ConfigError("Phi-MoE's sparsemixer router is top-2: num_experts_per_tok must be 2")
    sw = cfg.get("sliding_window")
    if sw is not None and sw < int(cfg.get("max_position_embeddings", 0)):
        # sliding_window >= max_position_embeddings (Phi-3.5-MoE: 131072) never masks anything.
        raise ConfigError(
            f"Phi-MoE sliding_window={sw} < max_position_embeddings: sliding-window attention is not supported"
        )
    rope = longrope_params(cfg)
    if rope is not None:
        half = head_dim(cfg, NAME) // 2
        for key in ("short_factor", "long_factor"):
            if len(rope[key]) != half:
                raise ConfigError(f"Phi-MoE longrope {key} has {len(rope[key])} entries, head_dim/2 = {half}")


def phimoe_transformer_config(
    hf_config: HFConfigLike,
    *,
    moe_ce_num_compressed: int = 0,
    moe_ce_variant: str = "ia3",
    **overrides,
) -> PhimoeTransformerConfig:
    """PhimoeTransformerConfig of a Phi-MoE HF config. `overrides` are config fields (parallel sizes
    default to the initialised megatron parallel state; SP on when TP > 1)."""
    cfg = hf_config_dict(hf_config)
    check_phimoe_config(cfg)
    kw = config_kwargs(cfg, FIELDS, NAME, moe_ce_num_compressed=moe_ce_num_compressed,
                       moe_ce_variant=moe_ce_variant, overrides=overrides)
    if kw.get("moe_expert_capacity_factor") is not None:
        raise ConfigError("--moe-expert-capacity-factor is not supported with Phi-MoE's sparsemixer router")
    return PhimoeTransformerConfig(**kw)


def phimoe_model_kwargs(hf_config: HFConfigLike) -> Dict[str, Any]:
    """PhimoeGPTModel keyword arguments (besides config/spec/pre/post_process) of a Phi-MoE config."""
    cfg = hf_config_dict(hf_config)
    return dict(
        vocab_size=require(cfg, "vocab_size", NAME),
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096 * 32)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(cfg, default=1e6),  # PhimoeConfig.default_theta
        share_embeddings_and_output_weights=False,
        longrope=longrope_params(cfg),
    )
