"""Build this rank's GPTModel for training: from an HF config (a registered model family such as
OLMoE, via `megatron_ce.convert.get_family(model_type).build_model`) or from Megatron shape flags.

`model_provider(args, tokenizer_len)` is the one function to swap for another model source.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_ce import compat
from megatron_ce.training.args import ArgError, converted_meta_dir, module_available

META_NAME = "megatron_ce.json"  # same file the converter writes (megatron_ce.convert.engine.META_NAME)


def model_source(args) -> Optional[Dict[str, Any]]:
    """The model description when it comes from a file: {"hf_config", "model_type", CE defaults}."""
    if args.model_config:
        from megatron_ce.models.common import hf_config_dict

        try:
            cfg = hf_config_dict(args.model_config)
        except (OSError, ValueError) as e:
            raise ArgError(f"--model-config={args.model_config}: {e}") from None
        return {"model_type": cfg.get("model_type"), "hf_config": cfg}
    meta_dir = converted_meta_dir(args)
    if meta_dir is not None:
        with open(os.path.join(meta_dir, META_NAME), encoding="utf-8") as f:
            return json.load(f)
    return None


def padded_vocab_size(n: int, divisible_by: int, tp: int) -> int:
    m = divisible_by * tp
    return ((n + m - 1) // m) * m


# Megatron-LM's fusions, on by default: TransformerConfig field -> (args field, name in the note).
FUSIONS = {
    "bias_activation_fusion": ("bias_swiglu_fusion", "bias-swiglu"),
    "bias_dropout_fusion": ("bias_dropout_fusion", "bias-dropout"),
    "masked_softmax_fusion": ("masked_softmax_fusion", "masked-softmax"),
    "apply_rope_fusion": ("apply_rope_fusion", "rope"),
    "gradient_accumulation_fusion": ("gradient_accumulation_fusion", "gradient-accumulation"),
}


def fusion_unavailable(field: str, swiglu: bool, cuda: bool) -> Optional[str]:
    """Why the kernel of a fusion cannot run here (None: it can). megatron-core raises at build or
    run time when a fusion is on without its kernel, so a missing one is turned off instead."""
    if not cuda:
        return "no GPU"
    if field == "bias_activation_fusion" and not swiglu:
        return "not a SwiGLU model"
    if field == "masked_softmax_fusion" and not (module_available("scaled_masked_softmax_cuda")
                                                 and module_available("scaled_upper_triang_masked_softmax_cuda")):
        return "no scaled_masked_softmax_cuda kernels"
    if field == "apply_rope_fusion":
        from megatron.core.models.common.embeddings import rope_utils

        if rope_utils.fused_apply_rotary_pos_emb is None:
            return "needs Transformer Engine"
    if field == "gradient_accumulation_fusion" and not module_available("fused_weight_gradient_mlp_cuda"):
        return "no fused_weight_gradient_mlp_cuda (apex)"  # megatron-core's own linear layers need it
    return None


def resolve_fusions(args, swiglu: bool, cuda: Optional[bool] = None) -> Tuple[Dict[str, bool], Optional[str]]:
    """(TransformerConfig fusion fields, a one-line note naming the fusions turned off for a missing
    kernel, or None). A fusion is on unless its --no-... flag is given or its kernel is missing; the
    opt-in ones (--moe-permute-fusion, --cross-entropy-loss-fusion) were checked in args.py."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kw, off = {}, {}
    for field, (dest, name) in FUSIONS.items():
        why = fusion_unavailable(field, swiglu, cuda) if getattr(args, dest, True) else None
        kw[field] = bool(getattr(args, dest, True)) and why is None
        if why is not None:
            off.setdefault(why, []).append(name)
    kw["moe_permute_fusion"] = bool(getattr(args, "moe_permute_fusion", False))
    kw["cross_entropy_loss_fusion"] = bool(getattr(args, "cross_entropy_loss_fusion", False))
    note = None
    if off:
        note = "fusions off (kernel not available): " + "; ".join(f"{', '.join(v)} ({k})" for k, v in off.items())
    return kw, note


def _config_overrides(args) -> Dict[str, Any]:
    """TransformerConfig fields set by training flags, whatever the model source."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tp = args.tensor_model_parallel_size
    kw = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size or tp,
        sequence_parallel=args.sequence_parallel,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_token_drop_policy=args.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=args.moe_grouped_gemm,
        **compat.legacy_grouped_gemm_kwargs(args.moe_grouped_gemm and args.transformer_impl == "local"),
        # docs/METHOD.md §1.11: the load-balancing loss is a flag, off by default for SFT.
        moe_router_load_balancing_type="aux_loss" if args.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_ce_split=args.moe_ce_split,
        moe_ce_main_mass=args.moe_ce_main_mass,
        moe_ce_min_main=args.moe_ce_min_main,
        moe_ce_max_main=args.moe_ce_max_main,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,  # loss = sum(loss * mask) / sum(mask) over the global batch
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=args.init_method_std,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
        recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
    )
    return kw


def model_provider(args, tokenizer_len: int) -> Tuple[torch.nn.Module, Optional[Dict[str, Any]]]:
    """(GPTModel for this rank's pipeline stage, metadata to write next to checkpoints or None).

    Parallel state must be initialised. Sets args.moe_ce_num_compressed / moe_ce_variant /
    padded_vocab_size to the values used.
    """
    source = model_source(args)
    try:
        overrides = _config_overrides(args)
    except ValueError as e:  # e.g. a layout the installed megatron-core no longer has (megatron_ce/compat.py)
        raise ArgError(str(e)) from None
    # The model families we convert (OLMoE, Phi-MoE) are SwiGLU-only.
    fusions, note = resolve_fusions(args, swiglu=source is not None or bool(args.swiglu))
    overrides.update(fusions)
    if note and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"note: {note}", flush=True)
    if source is not None:
        k_a = args.moe_ce_num_compressed
        if k_a is None:
            k_a = int(source.get("moe_ce_num_compressed") or 0)
        variant = args.moe_ce_variant or source.get("moe_ce_variant") or "ia3"
        args.moe_ce_num_compressed, args.moe_ce_variant = k_a, variant
        from megatron_ce.convert import get_family
        from megatron_ce.convert.mapping import ConversionError
        from megatron_ce.ce import ConfigError

        hf = source["hf_config"]
        try:
            family = get_family(source.get("model_type") or hf.get("model_type"))
            model = family.build_model(hf, moe_ce_num_compressed=k_a, moe_ce_variant=variant,
                                       use_te=args.transformer_impl == "transformer_engine", **overrides)
        except (ConversionError, ConfigError) as e:
            raise ArgError(str(e)) from None
        args.padded_vocab_size = int(hf["vocab_size"])
        meta = {"model_type": family.model_type, "hf_config": hf, "moe_ce_num_compressed": k_a,
                "moe_ce_variant": variant, "format": "megatron-core torch_dist",
                "dtype": "bfloat16" if args.bf16 else "float32"}
    else:
        args.moe_ce_num_compressed = args.moe_ce_num_compressed or 0
        args.moe_ce_variant = args.moe_ce_variant or "ia3"
        model = _model_from_flags(args, tokenizer_len, overrides)
        meta = None
    # A vocabulary we padded ourselves (shape flags, no --vocab-size) is right by construction.
    check_tokenizer_vocab(args, tokenizer_len, padded_here=source is None and not args.vocab_size)
    return model, meta


# Models pad their vocabulary past the tokenizer's size to a multiple of 64 or 128 (OLMoE 50280 ->
# 50304, Phi-3.5-MoE 32011 -> 32064); a larger gap means the tokenizer belongs to another model.
MAX_VOCAB_PADDING = 128


def check_tokenizer_vocab(args, tokenizer_len: int, padded_here: bool = False) -> None:
    vocab, tok = args.padded_vocab_size, args.tokenizer_model
    if tokenizer_len > vocab:
        raise ArgError(f"--tokenizer-model={tok} has {tokenizer_len} tokens but the model's vocabulary has {vocab} "
                       "(--vocab-size / the model config): token ids would index past the embedding")
    if not padded_here and vocab - tokenizer_len >= MAX_VOCAB_PADDING and not args.allow_vocab_padding:
        raise ArgError(f"--tokenizer-model={tok} has {tokenizer_len} tokens but the model's vocabulary has {vocab}, "
                       f"more than padding apart: the tokenizer of another model? (--allow-vocab-padding to accept)")


def _model_from_flags(args, tokenizer_len: int, overrides: Dict[str, Any]) -> torch.nn.Module:
    from megatron_ce.ce import CETransformerConfig, ConfigError, get_gpt_ce_layer_local_spec, get_gpt_ce_layer_te_spec
    from megatron_ce.models.common import build_gpt_model

    tp = args.tensor_model_parallel_size
    vocab = args.vocab_size or padded_vocab_size(tokenizer_len, args.make_vocab_size_divisible_by, tp)
    if vocab % tp:
        raise ArgError(f"--vocab-size={vocab} must be divisible by --tensor-model-parallel-size={tp}")
    args.padded_vocab_size = vocab
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    try:
        config = CETransformerConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            ffn_hidden_size=ffn,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size or ffn,
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_router_pre_softmax=bool(args.moe_router_pre_softmax),
            moe_router_dtype="fp32",
            normalization=args.normalization or "LayerNorm",
            layernorm_epsilon=args.norm_epsilon or 1e-5,
            gated_linear_unit=bool(args.swiglu),
            activation_func=F.silu if args.swiglu else F.gelu,
            add_bias_linear=not args.disable_bias_linear,
            qk_layernorm=bool(args.qk_layernorm),
            moe_ce_num_compressed=args.moe_ce_num_compressed,
            moe_ce_variant=args.moe_ce_variant,
            **overrides,
        )
    except (ConfigError, AssertionError, ValueError) as e:
        raise ArgError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    spec_kw = dict(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                   qk_layernorm=bool(args.qk_layernorm))
    if args.transformer_impl == "transformer_engine":
        spec = get_gpt_ce_layer_te_spec(**spec_kw)
    else:
        spec = get_gpt_ce_layer_local_spec(normalization=config.normalization,
                                           **compat.legacy_grouped_gemm_kwargs(compat.uses_legacy_grouped_gemm(config)),
                                           **spec_kw)
    model_kwargs = dict(
        vocab_size=vocab,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        position_embedding_type="rope",
        rotary_base=int(args.rotary_base or 10000),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        parallel_output=True,
    )
    return build_gpt_model(config, spec, model_kwargs)

