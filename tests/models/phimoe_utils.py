"""Tiny random Phi-MoE models (HF and megatron-core) for the model and conversion tests.

Top-level functions only: the distributed ones are pickled by reference into spawned ranks.
Generic helpers (logits, safetensors, PP broadcast) come from olmoe_utils.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from tests.models.olmoe_utils import (  # noqa: F401  (re-exported)
    broadcast_from_last_stage,
    hf_logits,
    load_safetensors_dir,
    mcore_logits,
    token_ids,
)

ORIGINAL_MAX = 16  # original_max_position_embeddings of the tiny config
SHORT_SEQ = 12  # <= ORIGINAL_MAX: short mscale
LONG_SEQ = 24  # > ORIGINAL_MAX: long mscale


def tiny_phimoe_config(**overrides):
    """A small Phi-MoE config: 2 layers, 4 experts (top-2 sparsemixer), GQA (4 heads, 2 KV heads),
    q/k/v/o and lm_head biases, LongRoPE with original context 16 and distinct short/long mscale.
    initializer_range 0.2 so routing and norms matter for the logits."""
    from transformers import PhimoeConfig

    head_dim = overrides.get("hidden_size", 32) // overrides.get("num_attention_heads", 4)
    half = head_dim // 2
    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.2,  # large eps: the sparsemixer mask keeps several experts
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.15 * i for i in range(half)],
            "long_factor": [1.5 + 0.75 * i for i in range(half)],
            "short_mscale": 1.05,
            "long_mscale": 1.35,
            "original_max_position_embeddings": ORIGINAL_MAX,
        },
    )
    kw.update(overrides)
    return PhimoeConfig(**kw)


def make_hf_model(config, seed: int = 0):
    """Random-init PhimoeForCausalLM (eval, fp32) with non-trivial norm weights and biases."""
    from transformers import PhimoeForCausalLM

    torch.manual_seed(seed)
    model = PhimoeForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def build_and_load(hf_config: dict, ckpt_dir: str, ce: int = 0, variant: str = "ia3", **overrides):
    """Phi-MoE mcore model for the current parallel state, weights from a dist checkpoint."""
    from megatron_ce.models.phimoe import build_phimoe_model

    from tests.models.olmoe_utils import load_built_model

    return load_built_model(build_phimoe_model, hf_config, ckpt_dir, ce, variant, **overrides)


def layouts_rank_fn(rank, world_size, runs: List[dict], hf_config: dict, ids_list, save_root: Optional[str]):
    """For each run {name, ckpt, tp, pp, ep, etp?, ce?, dispatcher?}: load the checkpoint at that
    layout, compute logits for every id tensor of `ids_list`, and (save_root) save the model again as
    a dist checkpoint save_root/name. Returns {name: [logits per ids]}."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_ce.runtime import destroy_parallel, init_parallel

    out = {}
    try:
        for run in runs:
            init_parallel(tp=run.get("tp", 1), pp=run.get("pp", 1), ep=run.get("ep", 1), etp=run.get("etp"), timeout_s=120)
            overrides = {}
            if "dispatcher" in run:
                overrides["moe_token_dispatcher_type"] = run["dispatcher"]
            model = build_and_load(hf_config, run["ckpt"], run.get("ce", 0), run.get("variant", "ia3"), **overrides)
            res = []
            for ids in ids_list:
                logits = mcore_logits(model, ids)
                res.append(broadcast_from_last_stage(logits, (ids.shape[0], ids.shape[1], hf_config["vocab_size"])))
            out[run["name"]] = res
            if save_root is not None:
                path = os.path.join(save_root, run["name"])
                os.makedirs(path, exist_ok=True)
                dist.barrier()
                dist_checkpointing.save(model.sharded_state_dict(), path)
                dist.barrier()
            del model
    finally:
        destroy_parallel()
    return out
