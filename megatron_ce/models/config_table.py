"""HF config -> TransformerConfig keyword arguments, declared as a table: one row per TransformerConfig
field, read by `translate`. Each family lists its rows after `COMMON_FIELDS` (`<family>/config.py`).

Rows:
- `hf(target, KEY, default, cast)`: config[KEY] through `cast`; a missing or null KEY takes `default`,
  or is a ConfigError naming KEY when the default is REQUIRED;
- `derived(target, fn)`: fn(config, family name), for values that combine keys;
- `const(target, value)`: what the family always uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Sequence

import torch
import torch.nn.functional as F

from megatron_ce.models.common import parallel_sizes, require

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    target: str  # TransformerConfig field
    read: Callable[[Mapping[str, Any], str], Any]  # (HF config dict, family name) -> value
    source: str = ""  # the HF key (or a note) it comes from, for reading the table


def hf(target: str, key: str, default: Any = REQUIRED, cast: Callable[[Any], Any] = lambda v: v) -> Field:
    def read(cfg, family):
        if cfg.get(key) is None:
            return cast(require(cfg, key, family)) if default is REQUIRED else default
        return cast(cfg[key])

    return Field(target, read, key)


def derived(target: str, fn: Callable[[Mapping[str, Any], str], Any], source: str = "derived") -> Field:
    return Field(target, fn, source)


def const(target: str, value: Any) -> Field:
    return Field(target, lambda cfg, family: value, "constant")


def head_dim(cfg: Mapping[str, Any], family: str) -> int:
    return cfg.get("head_dim") or require(cfg, "hidden_size", family) // require(cfg, "num_attention_heads", family)


def aux_loss_on(cfg: Mapping[str, Any]) -> bool:
    # HF adds the load-balancing loss only with output_router_logits (off in the reference SFT setting).
    return bool(cfg.get("output_router_logits", False))


def aux_loss_coeff(default: float) -> Field:
    return derived(
        "moe_aux_loss_coeff",
        lambda cfg, fam: float(cfg.get("router_aux_loss_coef", default)) if aux_loss_on(cfg) else 0.0,
        "router_aux_loss_coef if output_router_logits",
    )


# Rows every family shares: GPT MoE with SwiGLU experts and no linear biases.
COMMON_FIELDS = (
    hf("num_layers", "num_hidden_layers"),
    hf("hidden_size", "hidden_size"),
    hf("num_attention_heads", "num_attention_heads"),
    derived("num_query_groups", lambda cfg, fam: cfg.get("num_key_value_heads") or require(
        cfg, "num_attention_heads", fam), "num_key_value_heads"),
    derived("kv_channels", head_dim, "head_dim or hidden_size // num_attention_heads"),
    hf("ffn_hidden_size", "intermediate_size"),
    hf("moe_ffn_hidden_size", "intermediate_size"),
    const("moe_router_score_function", "softmax"),
    derived("moe_router_load_balancing_type", lambda cfg, fam: "aux_loss" if aux_loss_on(cfg) else "none",
            "output_router_logits"),
    hf("layernorm_epsilon", "rms_norm_eps", 1e-5, float),
    const("gated_linear_unit", True),
    const("activation_func", F.silu),
    const("add_bias_linear", False),
    # OLMoE's QK-norm comes from its spec (FullWidthRMSNorm; megatron-core's is per head), Phi-MoE has none
    const("qk_layernorm", False),
    const("hidden_dropout", 0.0),
    hf("attention_dropout", "attention_dropout", 0.0, float),
    hf("init_method_std", "initializer_range", 0.02, float),
    derived("use_cpu_initialization", lambda cfg, fam: not torch.cuda.is_available(), "no CUDA"),
)


def translate(cfg: Mapping[str, Any], fields: Sequence[Field], family: str) -> Dict[str, Any]:
    """The TransformerConfig keyword arguments the table `fields` reads from an HF config dict."""
    return {f.target: f.read(cfg, family) for f in fields}


def config_kwargs(cfg: Mapping[str, Any], fields: Sequence[Field], family: str, *, moe_ce_num_compressed: int,
                  moe_ce_variant: str, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """`translate` + CE fields + the initialised parallel sizes (SP on with TP) + caller overrides, and
    the pipeline dtype megatron-core requires with PP > 1 (the params dtype)."""
    kw = translate(cfg, fields, family)
    kw.update(moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant)
    kw.update(parallel_sizes())
    kw.update(overrides)
    if kw.get("pipeline_model_parallel_size", 1) > 1 and kw.get("pipeline_dtype") is None:
        kw["pipeline_dtype"] = kw.get("params_dtype") or (
            torch.bfloat16 if kw.get("bf16") else torch.float16 if kw.get("fp16") else torch.float32
        )
    return kw
