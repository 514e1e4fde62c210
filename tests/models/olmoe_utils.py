"""Tiny random OLMoE models (HF and megatron-core) for the model and conversion tests.

Top-level functions only: the distributed ones are pickled by reference into spawned ranks.
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional

import torch

SEQ = 16
BATCH = 2


def tiny_olmoe_config(**overrides):
    """A small OLMoE config: 2 layers, 4 experts top-2, GQA-free unless overridden; weights large
    enough (initializer_range 0.2) that routing and norms matter for the logits."""
    from transformers import OlmoeConfig

    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        eos_token_id=0,
        pad_token_id=1,
        initializer_range=0.2,
    )
    kw.update(overrides)
    return OlmoeConfig(**kw)


def make_hf_model(config, seed: int = 0):
    """Random-init OlmoeForCausalLM (eval, fp32) whose norm weights are not all ones."""
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def token_ids(seed: int = 0, vocab: int = 128, batch: int = BATCH, seq: int = SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def load_safetensors_dir(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def load_built_model(build_fn, hf_config: dict, ckpt_dir: str, ce: int = 0, variant: str = "ia3",
                     **overrides):
    """`build_fn(hf_config, ...)` (a family's build_*_model) for the current parallel state, weights
    from a dist checkpoint, in eval mode with gathered logits."""
    from megatron.core import dist_checkpointing

    model = build_fn(
        hf_config, moe_ce_num_compressed=ce, moe_ce_variant=variant, parallel_output=False, **overrides
    )
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    return model.eval()


def build_and_load(hf_config: dict, ckpt_dir: str, ce: int = 0, variant: str = "ia3", **overrides):
    """OLMoE mcore model for the current parallel state, weights from a dist checkpoint."""
    from megatron_ce.models.olmoe import build_olmoe_model

    return load_built_model(build_olmoe_model, hf_config, ckpt_dir, ce, variant, **overrides)


def mcore_logits(model, ids) -> Optional[torch.Tensor]:
    """Full logits [b, s, V] of this rank's model (PP: through the schedule; None off the last
    stage)."""
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return model(ids, pos, None).float()
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iterator, m):
            out = m(ids, pos, None)
            return out, lambda o: (o.sum() * 0, {"logits": o.detach()})

        res = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
            forward_only=True,
        )
        if ps.is_pipeline_last_stage():
            return res[0]["logits"].float()
        return None


def broadcast_from_last_stage(logits: Optional[torch.Tensor], shape) -> torch.Tensor:
    """Logits of the last pipeline stage on every rank of its pipeline group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return logits
    src = ps.get_pipeline_model_parallel_last_rank()
    buf = logits.contiguous() if logits is not None else torch.empty(shape)
    dist.broadcast(buf, src=src, group=ps.get_pipeline_model_parallel_group())
    return buf


def layouts_rank_fn(rank, world_size, runs: List[dict], hf_config: dict, ids, save_root: Optional[str]):
    """For each run {name, ckpt, tp, pp, ep, etp?, ce?, variant?, dispatcher?}: load the checkpoint at
    that layout, compute logits, and (save_root) save the model again as a dist checkpoint
    save_root/name. Returns {name: logits} (rank 0)."""
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
            logits = mcore_logits(model, ids)
            logits = broadcast_from_last_stage(logits, (ids.shape[0], ids.shape[1], hf_config["vocab_size"]))
            out[run["name"]] = logits
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


def olmoe_spec_fn(config):
    """OLMoE layer spec for tests/dist_harness.py's tiny GPT (top-level: pickled into ranks)."""
    from megatron_ce.models.olmoe import olmoe_layer_spec

    return olmoe_layer_spec(config)
