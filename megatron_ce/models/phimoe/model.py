"""Phi-MoE's attention, layer spec and GPT model on megatron-core, with or without Compressed Experts.

- `phimoe_layer_spec`: megatron-core's local (or TE) GPT layer spec with
  * `PhimoeSelfAttention` (LongRoPE attention scaling, longrope.py) and an o_proj bias: the spec's
    `linear_proj` class is swapped for a subclass that always allocates its bias (mcore ties that
    bias to `add_bias_linear`, which would also give the experts biases);
  * `SparseMixerRouter` (Phi-MoE's top-2 sparsemixer) as the MoE router;
  * the pre-MLP LayerNorm wrapped so that, in training, its output (= the MoE block input) is
    multiplied by U(1-eps, 1+eps) when `input_jitter_noise > 0` (router AND experts see it, as in
    Microsoft's Phi-MoE code);
  turned into a CE spec when CE is on (the router already mixes in CERouterMixin and is kept).
- `PhimoeGPTModel` / `build_phimoe_model`: GPTModel with LongRoPE inverse frequencies and an
  `output_layer.bias` (lm_head bias: mcore's GPTModel hard-codes `bias=False`; we attach a
  TP-sharded bias parameter exactly like ColumnParallelLinear allocates one, so forward, gather and
  the dist checkpoint handle it).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ce import compat
from megatron_ce.ce import to_ce_layer_spec
from megatron_ce.models.common import HFConfigLike, base_gpt_layer_spec, build_gpt_model, hf_config_dict
from megatron_ce.models.phimoe.config import PhimoeTransformerConfig, phimoe_model_kwargs, phimoe_transformer_config
from megatron_ce.models.phimoe.longrope import longrope_inv_freq
from megatron_ce.models.phimoe.router import SparseMixerRouter


class PhimoeSelfAttention(SelfAttention):
    """SelfAttention with LongRoPE's attention scaling: q and k are multiplied by short_mscale or
    long_mscale (by the forward's rotary length vs original_max_position_embeddings) before RoPE."""

    def __init__(self, *args, longrope: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.longrope = longrope
        self._mscale = 1.0

    def rope_mscale(self, rotary_pos_emb) -> float:
        if self.longrope is None or rotary_pos_emb is None:
            return 1.0
        emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        seq_len = emb.shape[0]
        cp = self.pg_collection.cp.size() if getattr(self.pg_collection, "cp", None) is not None else 1
        seq_len *= cp  # mcore slices the rotary table per CP rank
        lr = self.longrope
        return float(lr["long_mscale"] if seq_len > lr["original_max_position_embeddings"] else lr["short_mscale"])

    def forward(self, hidden_states, *args, **kwargs):
        self._mscale = self.rope_mscale(kwargs.get("rotary_pos_emb"))
        return super().forward(hidden_states, *args, **kwargs)

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        m = self._mscale
        if m == 1.0:
            return out
        if not isinstance(out, tuple) or len(out) != 3:
            raise NotImplementedError("LongRoPE mscale needs split q/k/v (no fused qkv-rope, no output gate)")
        q, k, v = out
        return q * m, k * m, v


_BIASED: Dict[type, type] = {}


def with_bias(cls: type) -> type:
    """Subclass of a linear layer class that always allocates a bias (whatever `bias=` it is built
    with); megatron-core builds linear_proj with bias=add_bias_linear."""
    if cls not in _BIASED:

        def __init__(self, *args, bias=True, **kwargs):
            cls.__init__(self, *args, bias=True, **kwargs)

        _BIASED[cls] = type(cls.__name__ + "WithBias", (cls,), {"__init__": __init__, "__module__": __name__})
    return _BIASED[cls]


def _jitter_hook(module, inputs, output):
    eps = module.phimoe_input_jitter_noise
    if module.training and eps > 0:
        return output * torch.empty_like(output).uniform_(1.0 - eps, 1.0 + eps)
    return output


class JitteredPreMoENorm:
    """Builds the spec's pre-MLP norm (`norm` param) and, when `phimoe_input_jitter_noise > 0`, adds a
    forward hook scaling its output (the MoE block input) by U(1-eps, 1+eps) in training. The norm
    module itself (class, parameters, state-dict names) is unchanged."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, norm=None, **kwargs):
        from megatron.core.transformer.spec_utils import build_module

        module = build_module(norm, config=config, hidden_size=hidden_size, eps=eps, **kwargs)
        noise = float(getattr(config, "phimoe_input_jitter_noise", 0.0) or 0.0)
        if noise > 0:
            module.phimoe_input_jitter_noise = noise
            module.register_forward_hook(_jitter_hook)
        return module


def phimoe_layer_spec(
    config: PhimoeTransformerConfig,
    *,
    longrope: Optional[Dict[str, Any]] = None,
    ce: Optional[bool] = None,
    use_te: bool = False,
) -> ModuleSpec:
    """GPT layer spec for Phi-MoE (see module docstring); a CE spec when `ce` (default:
    config.moe_ce_num_compressed > 0)."""
    spec = base_gpt_layer_spec(
        config, qk_layernorm=False, normalization="LayerNorm", use_te=use_te
    )
    spec = copy.copy(spec)
    layer_sub = copy.copy(spec.submodules)
    attn = copy.copy(layer_sub.self_attention)
    attn.module = PhimoeSelfAttention
    attn.params = {**(attn.params or {}), "longrope": longrope}
    if config.add_qkv_bias:  # HF attention_bias: q/k/v AND o_proj biases
        attn_sub = copy.copy(attn.submodules)
        attn_sub.linear_proj = with_bias(attn_sub.linear_proj)
        attn.submodules = attn_sub
    layer_sub.self_attention = attn
    layer_sub.pre_mlp_layernorm = ModuleSpec(module=JitteredPreMoENorm, params={"norm": layer_sub.pre_mlp_layernorm})
    # The MoE spec is a ModuleSpec or (megatron-core >= 0.18) a functools.partial: compat edits either.
    mlp_sub = copy.copy(compat.spec_submodules(layer_sub.mlp))
    mlp_sub.router = SparseMixerRouter
    layer_sub.mlp = compat.replace_spec(layer_sub.mlp, submodules=mlp_sub)
    spec.submodules = layer_sub
    if ce is None:
        ce = getattr(config, "moe_ce_num_compressed", 0) > 0
    return to_ce_layer_spec(spec) if ce else spec


class PhimoeGPTModel(GPTModel):
    """GPTModel + LongRoPE inverse frequencies + lm_head bias (`output_layer.bias`)."""

    def __init__(self, config, transformer_layer_spec, *, longrope: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(config=config, transformer_layer_spec=transformer_layer_spec, **kwargs)
        if longrope is not None and getattr(self, "rotary_pos_emb", None) is not None:
            rope = self.rotary_pos_emb
            inv = longrope_inv_freq(longrope, float(kwargs.get("rotary_base", 10000)), config.kv_channels)
            rope.inv_freq = inv.to(rope.inv_freq.device)
        if getattr(config, "phimoe_lm_head_bias", False) and self.post_process:
            self._add_output_bias()

    def _add_output_bias(self):
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        layer = self.output_layer
        if layer.bias is not None:
            return
        device = layer.weight.device if layer.weight is not None else None
        bias = torch.nn.Parameter(
            torch.empty(layer.output_size_per_partition, dtype=self.config.params_dtype, device=device)
        )
        set_tensor_model_parallel_attributes(bias, True, 0, 1)
        if self.config.perform_initialization and bias.device.type != "meta":
            with torch.no_grad():
                bias.zero_()
        setattr(bias, "allreduce", True)
        layer.bias = bias


def build_phimoe_model(
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
    """megatron-core PhimoeGPTModel of a Phi-MoE config for this rank (parallel state initialised).
    parallel_output=False gathers the logits over the vocabulary (TP)."""
    cfg = hf_config_dict(hf_config)
    config = phimoe_transformer_config(
        cfg, moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant, **config_overrides
    )
    kwargs = dict(phimoe_model_kwargs(cfg), parallel_output=parallel_output)
    spec = phimoe_layer_spec(config, longrope=kwargs["longrope"], use_te=use_te)
    return build_gpt_model(config, spec, kwargs, pre_process, post_process, vp_stage, model_class=PhimoeGPTModel)
