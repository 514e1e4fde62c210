"""Phi-MoE (microsoft/Phi-3.5-MoE-*) on megatron-core, with or without Compressed Experts.

From an HF `PhimoeConfig` (object, dict or config.json; transformers 4.x `rope_scaling` or 5.x
`rope_parameters`) this builds
- `phimoe_transformer_config`: a `PhimoeTransformerConfig` (a CETransformerConfig carrying the
  sparsemixer / jitter / lm_head-bias fields): LayerNorm with bias (eps = `rms_norm_eps`), q/k/v bias
  (`add_qkv_bias = attention_bias`), `add_bias_linear=False` (so neither the experts nor the router
  get biases), SwiGLU experts w2(silu(w1 x) * w3 x), GQA, no QK-norm.
- `phimoe_layer_spec`: megatron-core's local (or TE) GPT layer spec with
  * `PhimoeSelfAttention` (LongRoPE attention scaling, see below) and an o_proj bias: the spec's
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

LongRoPE, as transformers 5.24 `PhimoeRotaryEmbedding.forward` actually computes it:
  inv_freq = 1 / (short_factor * base^(2i/dim))  -- ALWAYS short_factor: the forward calls
      `rope_init_fn(config)` without seq_len (the `dynamic_rope_update` decorator's long/short buffer
      update is then ignored), so long_factor is never used by the pinned transformers;
  cos, sin = cos(p * inv_freq) * mscale, sin(p * inv_freq) * mscale, with
      mscale = long_mscale if max(position_ids) + 1 > original_max_position_embeddings else short_mscale.
  Here mscale is applied by scaling q and k by mscale before RoPE (RoPE is linear, so this equals
  scaling cos and sin; fp32 results agree to rounding). The length that decides is the full rotary
  length of the forward (sequence length incl. CP; mcore's RoPE always uses positions 0..S-1, so
  with default position ids it is HF's max(position_ids)+1). With packed sequences whose positions
  restart per document HF would decide by the longest document; we decide by the packed length.
  `long_factor` is read and validated but unused by default, to match the pinned transformers
  (`longrope_inv_freq(..., long=True)` gives the long set should a later transformers use it).
  Note: real Phi-3.5-MoE has short_mscale == long_mscale, so under transformers 5.24 sequences past
  4096 get no LongRoPE extension at all; we reproduce that (parity with the pinned transformers).

Sparsemixer (`sparsemixer`, `SparseMixerRouter`): eval path is transformers' function op for op (the
mask, argmax picks, softmax over unmasked logits, no renormalisation). Training path: Gumbel sampling,
the 1.0 / 0.3333 multiplier (Heun's third-order midpoint mask, rand > 0.75) and the custom backward
(`SparseMixerMultiplier`, same as transformers' PhimoeMultiplier) -- identical algorithm; departures:
* within the router, random numbers are drawn in transformers' order (same generator state -> same
  picks, weights and gradients; tested), but relative to the rest of the model (dropout, jitter) the
  order differs, so a whole training step is not bitwise reproducible against HF;
* input jitter is applied once to the MoE block input (Microsoft's original code). transformers 5.24
  applies it twice (the block and then the router multiply the same tensor in place);
* the load-balancing loss (off unless `output_router_logits`) is megatron-core's switch aux loss on
  softmax(logits) with the softmax top-2 (HF's choice of scores and selection; mcore's normalisation);
* capacity-factor token dropping is not supported with the sparsemixer (ConfigError).
`rank_selected` (CE split) ranks by PICK ORDER (first pick is main, second is compressed), not by
weight: the sparsemixer's second weight can exceed the first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ce import compat
from megatron_ce.ce import CERouterMixin, CETransformerConfig, to_ce_layer_spec
from megatron_ce.ce.config import ConfigError
from megatron_ce.models.common import (
    HFConfigLike,
    base_gpt_layer_spec,
    parallel_sizes,
    check_ce_layers,
    check_divisible,
    hf_config_dict,
    require,
    rope_theta,
)

MODEL_TYPE = "phimoe"


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------


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


def longrope_params(cfg: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """LongRoPE parameters of a 5.x (`rope_parameters`) or 4.x (`rope_scaling`) config, or None for
    plain RoPE. Returns short/long factor, short/long mscale, original_max_position_embeddings."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        params = {}
    rtype = params.get("rope_type") or params.get("type") or "default"
    if rtype == "default":
        return None
    if rtype != "longrope":
        raise ConfigError(f"Phi-MoE rope_type={rtype!r}: only 'default' and 'longrope' are supported")
    out = {}
    for key in ("short_factor", "long_factor", "short_mscale", "long_mscale"):
        if params.get(key) is None:
            raise ConfigError(f"Phi-MoE longrope config lacks {key!r}")
        out[key] = params[key]
    omp = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if omp is None:
        raise ConfigError("Phi-MoE longrope config lacks 'original_max_position_embeddings'")
    out["original_max_position_embeddings"] = int(omp)
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ConfigError("Phi-MoE with partial_rotary_factor != 1 is not supported")
    return out


def _head_dim(cfg: Mapping[str, Any]) -> int:
    return cfg.get("head_dim") or require(cfg, "hidden_size", "Phi-MoE") // require(
        cfg, "num_attention_heads", "Phi-MoE"
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
        half = _head_dim(cfg) // 2
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
    d = require(cfg, "hidden_size", "Phi-MoE")
    heads = require(cfg, "num_attention_heads", "Phi-MoE")
    ffn = require(cfg, "intermediate_size", "Phi-MoE")
    aux = bool(cfg.get("output_router_logits", False))
    kw: Dict[str, Any] = dict(
        num_layers=require(cfg, "num_hidden_layers", "Phi-MoE"),
        hidden_size=d,
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=_head_dim(cfg),
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=ffn,
        num_moe_experts=require(cfg, "num_local_experts", "Phi-MoE"),
        moe_router_topk=2,
        # used only by the load-balancing loss (HF: softmax over all experts, top-k of it)
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_dtype=None,  # router in the activation dtype, like HF's nn.Linear gate
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.001)) if aux else 0.0,
        normalization="LayerNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,  # experts, router: no bias; o_proj bias comes from the spec
        add_qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_layernorm=False,
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        use_cpu_initialization=not torch.cuda.is_available(),
        moe_ce_num_compressed=moe_ce_num_compressed,
        moe_ce_variant=moe_ce_variant,
        sparsemixer_eps=float(cfg.get("router_jitter_noise", 0.01)),
        phimoe_input_jitter_noise=float(cfg.get("input_jitter_noise", 0.0) or 0.0),
        phimoe_lm_head_bias=bool(cfg.get("lm_head_bias", False)),
    )
    kw.update(parallel_sizes())
    kw.update(overrides)
    if kw.get("moe_expert_capacity_factor") is not None:
        raise ConfigError("--moe-expert-capacity-factor is not supported with Phi-MoE's sparsemixer router")
    if kw.get("pipeline_model_parallel_size", 1) > 1 and kw.get("pipeline_dtype") is None:
        kw["pipeline_dtype"] = kw.get("params_dtype") or (
            torch.bfloat16 if kw.get("bf16") else torch.float16 if kw.get("fp16") else torch.float32
        )
    return PhimoeTransformerConfig(**kw)


# ------------------------------------------------------------------------------------------
# sparsemixer router
# ------------------------------------------------------------------------------------------


class SparseMixerMultiplier(torch.autograd.Function):
    """transformers' PhimoeMultiplier: forward multiplier * mask_for_one; backward sends
    grad*multiplier * (onehot(selected) - masked_gates) to the router scores only."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected_experts, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected_experts, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_at_output):
        multiplier, selected_experts, masked_gates = ctx.saved_tensors
        grad_at_output = grad_at_output * multiplier
        grad_at_scores_expanded = masked_gates * grad_at_output.mul(-1)
        grad_at_scores_expanded.scatter_add_(dim=-1, index=selected_experts, src=grad_at_output)
        return grad_at_scores_expanded, None, None, None, None


def _sparsemixer_pick(scores, candidates, jitter_eps: float, training: bool, second: bool = False):
    """One sparsemixer pick. `candidates` is `scores` with earlier picks set to -inf (the threshold's
    denominator uses the unmasked scores, as in transformers). Random numbers are drawn exactly as
    transformers draws them (including its second pick's `rand_like(...).uniform_()`, which draws
    twice), so with the same generator state the training path is identical too."""
    with torch.no_grad():
        threshold, max_ind = candidates.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=threshold)
        mask = ((threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates = candidates.masked_fill(mask, float("-inf"))
    if training:
        gumbel = torch.empty_like(masked_gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
        selected = (masked_gates - gumbel).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected = max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier_o = masked_gates.gather(dim=-1, index=selected)
    if training:
        max_scores, max_ind = masked_gates.max(dim=-1, keepdim=True)
        rand = torch.rand_like(max_scores)
        if second:
            rand = rand.uniform_()
        mask_for_one = torch.logical_or(selected == max_ind, rand > 0.75)
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(masked_gates)
        multiplier = SparseMixerMultiplier.apply(scores, multiplier_o, selected, masked_gates, mask_for_one)
    else:
        multiplier = multiplier_o
    return multiplier, selected


def sparsemixer(scores: torch.Tensor, jitter_eps: float, training: bool):
    """Phi-MoE's top-2 sparsemixer on router logits [T, E]: (weights [T, 2], experts [T, 2]) in pick
    order (transformers' `sparsemixer`, same ops)."""
    m1, s1 = _sparsemixer_pick(scores, scores, jitter_eps, training)
    masked_scores = torch.scatter(scores, -1, s1, float("-inf"))
    m2, s2 = _sparsemixer_pick(scores, masked_scores, jitter_eps, training, second=True)
    return torch.concat((m1, m2), dim=-1), torch.concat((s1, s2), dim=-1)


class SparseMixerRouter(CERouterMixin, TopKRouter):
    """megatron-core TopKRouter whose routing is Phi-MoE's sparsemixer (top-2).

    Returns dense `probs` [T, E] (the two sparsemixer weights, zeros elsewhere) and `routing_map`.
    For CE, `rank_selected` returns the pick order of the last routing call (first pick = main).
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        # kwargs: what newer megatron-core releases pass routers (is_mtp_layer, 0.17; megatron_ce/compat.py)
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        if self.topk != 2:
            raise ConfigError("the sparsemixer router is top-2: --moe-router-topk must be 2")
        self.sparsemixer_eps = float(getattr(config, "sparsemixer_eps", 0.01))
        self._pick_order: Optional[torch.Tensor] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        weights, selected = sparsemixer(logits, self.sparsemixer_eps, self.training)
        self._pick_order = selected.detach()
        probs = torch.zeros_like(logits).scatter(1, selected, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, selected, True)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

            routing_map_for_aux_loss, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=self.config.moe_router_fusion, padding_mask=padding_mask
            )
            with_pad = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores_for_aux_loss, routing_map_for_aux_loss, with_padding_mask=with_pad)
            probs = self._apply_seq_aux_loss(
                probs, scores_for_aux_loss, routing_map_for_aux_loss, seq_length, bsz, with_padding_mask=with_pad
            )
            probs = self._apply_global_aux_loss(
                probs, scores_for_aux_loss, routing_map_for_aux_loss, with_padding_mask=with_pad
            )
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def rank_selected(self, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        order = self._pick_order
        if order is None or order.shape[0] != probs.shape[0]:
            raise RuntimeError("SparseMixerRouter.rank_selected needs the routing of the same forward")
        return order


# ------------------------------------------------------------------------------------------
# attention, norms, linear with bias
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# spec / model
# ------------------------------------------------------------------------------------------


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


def longrope_inv_freq(longrope: Dict[str, Any], base: float, dim: int, long: bool = False) -> torch.Tensor:
    """transformers' `_compute_longrope_parameters` inverse frequencies (short factors unless `long`)."""
    ext = torch.tensor(longrope["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (ext * base**inv_freq_shape)


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


def phimoe_model_kwargs(hf_config: HFConfigLike) -> Dict[str, Any]:
    """PhimoeGPTModel keyword arguments (besides config/spec/pre/post_process) of a Phi-MoE config."""
    cfg = hf_config_dict(hf_config)
    return dict(
        vocab_size=require(cfg, "vocab_size", "Phi-MoE"),
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096 * 32)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(cfg, default=1e6),  # PhimoeConfig.default_theta
        share_embeddings_and_output_weights=False,
        longrope=longrope_params(cfg),
    )


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
    from megatron.core import parallel_state

    cfg = hf_config_dict(hf_config)
    config = phimoe_transformer_config(
        cfg, moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant, **config_overrides
    )
    kwargs = dict(phimoe_model_kwargs(cfg), parallel_output=parallel_output)
    spec = phimoe_layer_spec(config, longrope=kwargs["longrope"], use_te=use_te)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check_divisible(kwargs["vocab_size"], tp, "--vocab-size", "--tensor-model-parallel-size")
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = PhimoeGPTModel(
        config=config, transformer_layer_spec=spec, pre_process=pre_process, post_process=post_process, **kwargs
    )
    check_ce_layers(model, config)
    return model
