"""OLMoE's layer spec and model on megatron-core, with or without Compressed Experts.

- `olmoe_layer_spec`: megatron-core's GPT layer spec (local or Transformer-Engine) with OLMoE's
  full-width QK-norm (`qk_norm.FullWidthRMSNorm`) and `clip_qkv`, turned into a CE spec when CE is on.
- `build_olmoe_model`: the GPTModel of an HF config (`config.py`) for this rank.
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ce.ce import CETransformerConfig, to_ce_layer_spec
from megatron_ce.models.common import HFConfigLike, base_gpt_layer_spec, build_gpt_model, hf_config_dict
from megatron_ce.models.olmoe.config import olmoe_model_kwargs, olmoe_transformer_config
from megatron_ce.models.olmoe.qk_norm import FullWidthRMSNorm


class OlmoeSelfAttention(SelfAttention):
    """SelfAttention with OLMoE's optional `clip_qkv`: q, k (after QK-norm) and v clamped to
    [-clip, clip] before RoPE, as transformers does."""

    def __init__(self, *args, clip_qkv: Optional[float] = None, submodules=None, **kwargs):
        # megatron-core >= 0.19 refuses q/k_layernorm specs while config.qk_layernorm is False (which it
        # must stay, see qk_norm.py): build the parent without them, then ours as it would.
        qk = (submodules.q_layernorm, submodules.k_layernorm)
        submodules = copy.copy(submodules)
        submodules.q_layernorm = submodules.k_layernorm = None
        super().__init__(*args, submodules=submodules, **kwargs)
        from megatron.core.transformer.spec_utils import build_module

        self.q_layernorm, self.k_layernorm = (
            build_module(spec, hidden_size=self.hidden_size_per_attention_head, config=self.config,
                         eps=self.config.layernorm_epsilon) if spec is not None else None
            for spec in qk
        )
        self.clip_qkv = clip_qkv

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self.clip_qkv is None:
            return out
        if not isinstance(out, tuple) or len(out) != 3:
            raise NotImplementedError("clip_qkv needs split q/k/v (no fused qkv-rope, no output gate)")
        c = self.clip_qkv
        return tuple(t.clamp(min=-c, max=c) for t in out)


def olmoe_layer_spec(
    config: CETransformerConfig,
    *,
    clip_qkv: Optional[float] = None,
    ce: Optional[bool] = None,
    use_te: bool = False,
) -> ModuleSpec:
    """GPT layer spec for OLMoE: mcore's local (or TE) spec with full-width QK-norm; a CE spec when
    `ce` (default: config.moe_ce_num_compressed > 0)."""
    spec = base_gpt_layer_spec(
        config, qk_layernorm=True, normalization="RMSNorm", use_te=use_te
    )
    spec = copy.copy(spec)
    layer_sub = copy.copy(spec.submodules)
    attn = copy.copy(layer_sub.self_attention)
    attn.module = OlmoeSelfAttention
    attn.params = {**(attn.params or {}), "clip_qkv": clip_qkv}
    attn_sub = copy.copy(attn.submodules)
    attn_sub.q_layernorm = ModuleSpec(
        module=FullWidthRMSNorm, params={"num_heads": config.num_attention_heads}
    )
    attn_sub.k_layernorm = ModuleSpec(
        module=FullWidthRMSNorm,
        params={"num_heads": config.num_query_groups or config.num_attention_heads},
    )
    attn.submodules = attn_sub
    layer_sub.self_attention = attn
    spec.submodules = layer_sub
    if ce is None:
        ce = getattr(config, "moe_ce_num_compressed", 0) > 0
    return to_ce_layer_spec(spec) if ce else spec


def build_olmoe_model(
    hf_config: HFConfigLike,
    *,
    moe_ce_num_compressed: int = 0,
    moe_ce_variant: str = "ia3",
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    use_te: bool = False,
    parallel_output: bool = True,
    **config_overrides,
):
    """megatron-core GPTModel of an OLMoE config for this rank (parallel state must be initialised).

    parallel_output=False gathers the logits over the vocabulary (TP) instead of leaving them split.
    `config_overrides` are TransformerConfig fields (e.g. bf16, moe_token_dispatcher_type)."""
    cfg = hf_config_dict(hf_config)
    config = olmoe_transformer_config(
        cfg,
        moe_ce_num_compressed=moe_ce_num_compressed,
        moe_ce_variant=moe_ce_variant,
        **config_overrides,
    )
    spec = olmoe_layer_spec(config, clip_qkv=cfg.get("clip_qkv"), use_te=use_te)
    model_kwargs = dict(olmoe_model_kwargs(cfg), parallel_output=parallel_output)
    return build_gpt_model(config, spec, model_kwargs, pre_process, post_process, vp_stage)
