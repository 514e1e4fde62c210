"""OLMoE (allenai/OLMoE-*) on megatron-core, with or without Compressed Experts.

From an HF `OlmoeConfig` (object, dict or config.json) this builds
- `olmoe_transformer_config`: a `CETransformerConfig` (RMSNorm, SwiGLU experts, no biases, softmax
  router: `moe_router_pre_softmax=True` for `norm_topk_prob=False` (softmax over all experts, top-k, no
  renormalisation) and False for `norm_topk_prob=True` (top-k logits, softmax over them: the same
  renormalised weights)). The load-balancing loss follows HF: on (coefficient `router_aux_loss_coef`)
  only when `output_router_logits` is true, else off (the reference SFT setting).
- `olmoe_layer_spec`: megatron-core's GPT layer spec (local or Transformer-Engine) with OLMoE's QK-norm,
  turned into a CE spec when CE is on.
- `olmoe_model_kwargs` / `build_olmoe_model`: the GPTModel (untied embeddings, RoPE theta from config).

OLMoE's QK-norm is one RMSNorm over the whole projected q (width heads*head_dim) and k (width
kv_heads*head_dim) of a token, before the split into heads. megatron-core's `qk_layernorm` normalises
each head separately, a different function. `FullWidthRMSNorm` replaces mcore's q/k layernorm
submodules through the spec: it receives the heads of this TP rank ([..., heads/tp, head_dim]), takes
the sum of squares over them, all-reduces it over the tensor-parallel group (an autograd all-reduce:
the backward all-reduces as well, since every rank's mean depends on every rank's slice) and divides by
the full width. Its weight is TP-sharded like the q/k columns of linear_qkv (partition_dim 0, so the
dist checkpoint holds the full HF vector), which also makes its gradients correct under SP: the
attention input is all-gathered over the sequence before linear_qkv, so each rank sees every token
for its own slice of the weight. `config.qk_layernorm` stays False: with it megatron-core would
all-reduce these (sharded) gradients over TP as if they were replicated.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ce.ce import CETransformerConfig, to_ce_layer_spec
from megatron_ce.ce.config import ConfigError
from megatron_ce.ce.layer import param_device
from megatron_ce.models.common import (
    HFConfigLike,
    base_gpt_layer_spec,
    parallel_sizes,
    build_gpt_model,
    hf_config_dict,
    require,
    rope_theta,
    rope_type,
)

MODEL_TYPE = "olmoe"


# ------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group whose backward is a sum as well (each rank's output depends on every
    rank's input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over all heads of a token (q or k), TP-aware. Input [..., heads/tp, head_dim].

    Built by mcore's SelfAttention as its q_layernorm / k_layernorm with hidden_size = head_dim;
    `num_heads` (spec param) is the global number of heads of that projection.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, num_heads: Optional[int] = None):
        super().__init__()
        from megatron.core import parallel_state, tensor_parallel

        if num_heads is None:
            raise ValueError("FullWidthRMSNorm needs num_heads (set it in the ModuleSpec params)")
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = self.tp_group.size()
        if num_heads % tp != 0:
            raise ConfigError(
                f"{num_heads} heads must be divisible by --tensor-model-parallel-size={tp}"
            )
        self.head_dim = hidden_size
        self.num_heads_local = num_heads // tp
        self.full_width = num_heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(
                self.num_heads_local * hidden_size,
                dtype=config.params_dtype,
                device=param_device(config),  # where mcore puts linear_qkv, whose columns it scales
            )
        )
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        ss = xf.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_group.size() > 1:
            ss = _AllReduceSum.apply(ss, self.tp_group)
        y = xf * torch.rsqrt(ss / self.full_width + self.eps)
        return self.weight.view(self.num_heads_local, self.head_dim) * y.to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 0},  # TP-sharded like the q/k columns of linear_qkv
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )

    def extra_repr(self) -> str:
        return f"width={self.full_width}, local_heads={self.num_heads_local}, eps={self.eps}"


class OlmoeSelfAttention(SelfAttention):
    """SelfAttention with OLMoE's optional `clip_qkv`: q, k (after QK-norm) and v clamped to
    [-clip, clip] before RoPE, as transformers does."""

    def __init__(self, *args, clip_qkv: Optional[float] = None, submodules=None, **kwargs):
        # megatron-core >= 0.19 refuses q/k_layernorm specs while config.qk_layernorm is False (which it
        # must stay, see the module docstring): build the parent without them, then ours as it would.
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


# ------------------------------------------------------------------------------------------
# config / spec / model
# ------------------------------------------------------------------------------------------


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
    heads = require(cfg, "num_attention_heads", "OLMoE")
    d = require(cfg, "hidden_size", "OLMoE")
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
    d = require(cfg, "hidden_size", "OLMoE")
    heads = require(cfg, "num_attention_heads", "OLMoE")
    kv_heads = cfg.get("num_key_value_heads") or heads
    ffn = require(cfg, "intermediate_size", "OLMoE")
    aux = bool(cfg.get("output_router_logits", False))
    kw: Dict[str, Any] = dict(
        num_layers=require(cfg, "num_hidden_layers", "OLMoE"),
        hidden_size=d,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=cfg.get("head_dim") or d // heads,
        ffn_hidden_size=ffn,
        moe_ffn_hidden_size=ffn,
        num_moe_experts=require(cfg, "num_experts", "OLMoE"),
        moe_router_topk=require(cfg, "num_experts_per_tok", "OLMoE"),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.01)) if aux else 0.0,
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-5)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,  # see module docstring: the spec supplies FullWidthRMSNorm
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        use_cpu_initialization=not torch.cuda.is_available(),
        moe_ce_num_compressed=moe_ce_num_compressed,
        moe_ce_variant=moe_ce_variant,
    )
    kw.update(parallel_sizes())
    kw.update(overrides)
    if kw.get("pipeline_model_parallel_size", 1) > 1 and kw.get("pipeline_dtype") is None:
        kw["pipeline_dtype"] = kw.get("params_dtype") or (
            torch.bfloat16 if kw.get("bf16") else torch.float16 if kw.get("fp16") else torch.float32
        )
    return CETransformerConfig(**kw)


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


def olmoe_model_kwargs(hf_config: HFConfigLike) -> Dict[str, Any]:
    """GPTModel keyword arguments (besides config/spec/pre/post_process) of an OLMoE HF config."""
    cfg = hf_config_dict(hf_config)
    return dict(
        vocab_size=require(cfg, "vocab_size", "OLMoE"),
        max_sequence_length=int(cfg.get("max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(cfg),
        share_embeddings_and_output_weights=False,
    )


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
