"""Tiny random models of every family (HF and megatron-core) for the model, conversion and HF tests.

One set of helpers for all families; what differs between them is data in `FAMILIES` (the tiny config,
the transformers classes). The megatron-core side is built through megatron_ce.models.registry.
Top-level functions only: the distributed ones are pickled by reference into spawned ranks.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

SEQ = 16
BATCH = 2
# Phi-MoE's tiny LongRoPE config
ORIGINAL_MAX = 16  # original_max_position_embeddings
SHORT_SEQ = 12  # <= ORIGINAL_MAX: short mscale
LONG_SEQ = 24  # > ORIGINAL_MAX: long mscale


def _olmoe_kwargs(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """2 layers, 4 experts top-2, GQA-free unless overridden."""
    return dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        eos_token_id=0, pad_token_id=1, initializer_range=0.2,
    )


def _phimoe_kwargs(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """2 layers, 4 experts (top-2 sparsemixer), GQA (4 heads, 2 KV heads), q/k/v/o and lm_head biases,
    LongRoPE with original context 16 and distinct short/long mscale."""
    half = overrides.get("hidden_size", 32) // overrides.get("num_attention_heads", 4) // 2
    return dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        attention_bias=True, lm_head_bias=True,
        router_jitter_noise=0.2,  # large eps: the sparsemixer mask keeps several experts
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
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


@dataclass(frozen=True)
class TinyFamily:
    model_type: str
    config_class: str  # transformers class names
    model_class: str
    defaults: Callable[[Dict[str, Any]], Dict[str, Any]]  # overrides -> tiny config kwargs

    def tiny_config(self, **overrides):
        """The family's tiny HF config; initializer_range 0.2 so routing and norms matter for the logits."""
        import transformers

        kw = self.defaults(overrides)
        kw.update(overrides)
        return getattr(transformers, self.config_class)(**kw)

    def build(self, hf_config, **kwargs):
        """The megatron-core model (the family's registered builder, current parallel state)."""
        from megatron_ce.models.registry import get_family

        return get_family(self.model_type).build_model(hf_config, **kwargs)


FAMILIES: Dict[str, TinyFamily] = {
    "olmoe": TinyFamily("olmoe", "OlmoeConfig", "OlmoeForCausalLM", _olmoe_kwargs),
    "phimoe": TinyFamily("phimoe", "PhimoeConfig", "PhimoeForCausalLM", _phimoe_kwargs),
}


def tiny_config(model_type: str, **overrides):
    return FAMILIES[model_type].tiny_config(**overrides)


def tiny_olmoe_config(**overrides):
    return tiny_config("olmoe", **overrides)


def tiny_phimoe_config(**overrides):
    return tiny_config("phimoe", **overrides)


def make_hf_model(config, seed: int = 0):
    """Random-init HF CausalLM of the config's family (eval, fp32) whose norm weights are not all ones
    and whose biases are not zero."""
    import transformers

    from megatron_ce.models.registry import base_model_type

    cls = getattr(transformers, FAMILIES[base_model_type(config.model_type)].model_class)
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
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


def build_and_load(hf_config: dict, ckpt_dir: str, ce: int = 0, variant: str = "ia3", **overrides):
    """The mcore model of `hf_config`'s family for the current parallel state, weights from a dist
    checkpoint, in eval mode with gathered logits."""
    from megatron.core import dist_checkpointing

    model = FAMILIES[hf_config["model_type"]].build(
        hf_config, moe_ce_num_compressed=ce, moe_ce_variant=variant, parallel_output=False, **overrides
    )
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    return model.eval()


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


def _all_logits(model, ids_list: Sequence[torch.Tensor], vocab: int) -> List[torch.Tensor]:
    return [broadcast_from_last_stage(mcore_logits(model, ids), (ids.shape[0], ids.shape[1], vocab))
            for ids in ids_list]


def _save(model, path: str):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)
    dist.barrier()


def layouts_rank_fn(rank, world_size, runs: List[dict], hf_config: dict,
                    ids: Union[torch.Tensor, Sequence[torch.Tensor]], save_root: Optional[str]):
    """For each run {name, ckpt, tp, pp, ep, etp?, ce?, variant?, dispatcher?}: load the checkpoint at
    that layout, compute logits for `ids` (one tensor, or a list of them), and (save_root) save the
    model again as a dist checkpoint save_root/name. Returns {name: logits (a list for a list)}."""
    from megatron_ce.runtime import destroy_parallel, init_parallel

    single = torch.is_tensor(ids)
    out = {}
    try:
        for run in runs:
            init_parallel(tp=run.get("tp", 1), pp=run.get("pp", 1), ep=run.get("ep", 1), etp=run.get("etp"), timeout_s=120)
            overrides = {}
            if "dispatcher" in run:
                overrides["moe_token_dispatcher_type"] = run["dispatcher"]
            model = build_and_load(hf_config, run["ckpt"], run.get("ce", 0), run.get("variant", "ia3"), **overrides)
            res = _all_logits(model, [ids] if single else ids, hf_config["vocab_size"])
            out[run["name"]] = res[0] if single else res
            if save_root is not None:
                _save(model, os.path.join(save_root, run["name"]))
            del model
    finally:
        destroy_parallel()
    return out


def olmoe_spec_fn(config):
    """OLMoE layer spec for tests/dist_harness.py's tiny GPT (top-level: pickled into ranks)."""
    from megatron_ce.models.olmoe import olmoe_layer_spec

    return olmoe_layer_spec(config)
