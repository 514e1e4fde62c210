"""OLMoE HF config -> CETransformerConfig (a field table) and GPTModel keyword arguments.

RMSNorm, SwiGLU experts, no biases, softmax router: `moe_router_pre_softmax=True` for
`norm_topk_prob=False` (softmax over all experts, top-k, no renormalisation) and False for
`norm_topk_prob=True` (top-k logits, softmax over them: the same renormalised weights). The
load-balancing loss follows HF: on (coefficient `router_aux_loss_coef`) only when
`output_router_logits` is true, else off (the reference SFT setting).
"""

from __future__ import annotations

from typing import Any, Dict

from megatron_ce.ce import CETransformerConfig
from megatron_ce.ce.config import ConfigError
from megatron_ce.models.common import HFConfigLike, hf_config_dict, require, rope_theta, rope_type
from megatron_ce.models.config_table import COMMON_FIELDS, aux_loss_coeff, config_kwargs, const, derived, hf
from megatron_ce.models.olmoe.presets import MODEL_TYPE

NAME = "OLMoE"  # in error messages

FIELDS = COMMON_FIELDS + (
    hf("num_moe_experts", "num_experts"),
    hf("moe_router_topk", "num_experts_per_tok"),
    derived("moe_router_pre_softmax", lambda cfg, fam: not bool(cfg.get("norm_topk_prob", False)), "norm_topk_prob"),
    const("moe_router_dtype", "fp32"),
    aux_loss_coeff(0.01),
    const("normalization", "RMSNorm"),
    const("add_qkv_bias", False),
)


def check_olmoe_config(cfg: Dict[str, Any]) -> None:
    """Errors for OLMoE config values this implementation does not cover."""
    mt = cfg.get("model_type", MODEL_TYPE)
    if mt != MODEL_TYPE:
        raise ConfigError(f"config model_type={mt!r} is not {MODEL_TYPE!r}")
    if cfg.get("attention_bias"):
        raise ConfigError("OLMoE with attention_bias=true is not supported")
    if cfg.get("tie_word_embeddings"):
        raise ConfigError("OLMoE with tie_word_embeddings=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"OLMoE hidden_act={cfg['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if rope_type(cfg) != "default":
        raise ConfigError(f"OLMoE rope_type={rope_type(cfg)!r}: only default RoPE is supported")
    heads = require(cfg, "num_attention_heads", NAME)
    d = require(cfg, "hidden_size", NAME)
    head_dim = cfg.get("head_dim") or d // heads
    if head_dim * heads != d:
        # transformers sizes k_norm as (hidden/heads)*kv_heads and q_norm as hidden.
        raise ConfigError("OLMoE needs num_attention_heads * head_dim == hidden_size")


def olmoe_transformer_config(
    hf_config: HFConfigLike,
    *,
    moe_ce_num_compressed: int = 0,
    moe_ce_variant: str = "ia3",
    **overrides,
) -> CETransformerConfig:
    """CETransformerConfig of an OLMoE HF config. `overrides` are TransformerConfig fields (parallel
    sizes default to the initialised megatron parallel state; SP on when TP > 1)."""
    cfg = hf_config_dict(hf_config)
    check_olmoe_config(cfg)
    return CETransformerConfig(**config_kwargs(
        cfg, FIELDS, NAME, moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant,
        overrides=overrides,
    ))


def olmoe_model_kwargs(hf_config: HFConfigLike) -> Dict[str, Any]:
    """GPTModel keyword arguments (besides config/spec/pre/post_process) of an OLMoE HF config."""
    cfg = hf_config_dict(hf_config)
    return dict(
        vocab_size=require(cfg, "vocab_size", NAME),
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(cfg),
        share_embeddings_and_output_weights=False,
    )
