"""Released model configs, embedded so the tools need no download (values from the HF config.json files
of allenai/OLMoE-1B-7B-0924 and microsoft/Phi-3.5-MoE-instruct; rope scaling factors of Phi are not
needed for counting/benchmarking and are left out)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Tuple

OLMOE_1B_7B: Dict[str, Any] = dict(
    model_type="olmoe",
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    clip_qkv=None,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
    hidden_act="silu",
    initializer_range=0.02,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
)

PHI_35_MOE: Dict[str, Any] = dict(
    model_type="phimoe",
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=6400,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,  # LongRoPE factors omitted (no parameters)
    tie_word_embeddings=False,
    attention_bias=True,
    lm_head_bias=True,
    router_jitter_noise=0.01,
    input_jitter_noise=0.01,
    router_aux_loss_coef=0.0,
    output_router_logits=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=32000,
)

BUILTIN = {"olmoe": OLMOE_1B_7B, "phimoe": PHI_35_MOE}


def load_model_config(name_or_path: str) -> Tuple[str, Dict[str, Any]]:
    """("olmoe" | "phimoe", HF config dict) for a built-in name or a config.json path / directory."""
    if name_or_path in BUILTIN:
        return name_or_path, copy.deepcopy(BUILTIN[name_or_path])
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    mt = cfg.get("model_type", "")
    family = {"olmoe": "olmoe", "olmoe_ce": "olmoe", "phimoe": "phimoe"}.get(mt)
    if family is None:
        raise ValueError(f"{path}: model_type {mt!r} is not olmoe or phimoe")
    return family, cfg


def num_experts(cfg: Dict[str, Any]) -> int:
    return int(cfg.get("num_experts") or cfg.get("num_local_experts"))
