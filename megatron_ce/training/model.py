"""Build this rank's GPTModel for training: from an HF config (a registered model family such as
OLMoE, via `megatron_ce.models.registry.get_family(model_type).build_model`) or from Megatron shape flags.

`model_provider(args, tokenizer_len)` is the one function to swap for another model source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_ce import compat
from megatron_ce.checkpoint_format import FormatError, ModelRecord
from megatron_ce.training.args import ArgError, model_record_path, module_available
from megatron_ce.training.checkpoint import CheckpointError


@dataclass(frozen=True)
class ModelSettings:
    """What building the model resolved beyond the flags, returned instead of written into `args`:
    the CE settings (a flag left unset takes the checkpoint record's value, else the record format's
    default), the padded vocabulary and the megatron_ce.json record to save with checkpoints (None for
    a model built from shape flags)."""

    moe_ce_num_compressed: int
    moe_ce_variant: str
    padded_vocab_size: int
    record: Optional[ModelRecord]


def model_source(args) -> Optional[ModelRecord]:
    """The model description when it comes from a file: --model-config, else a megatron_ce.json record
    (model_record_path); None: the shape flags."""
    if args.model_config:
        from megatron_ce.models.common import hf_config_dict

        try:
            cfg = hf_config_dict(args.model_config)
        except (OSError, ValueError) as e:
            raise ArgError(f"--model-config={args.model_config}: {e}") from None
        return ModelRecord(model_type=cfg.get("model_type"), hf_config=cfg)
    path = model_record_path(args)
    if path is None:
        return None
    try:
        return ModelRecord.read(path)
    except FormatError as e:
        raise CheckpointError(str(e)) from None


def resolve_ce(args, source: Optional[ModelRecord]) -> Tuple[int, str]:
    """(k_a, variant): the flags where given, else the record's (the format's defaults without one)."""
    base = source if source is not None else ModelRecord(model_type=None, hf_config={})
    k_a = args.moe_ce_num_compressed
    return (base.moe_ce_num_compressed if k_a is None else k_a), (args.moe_ce_variant or base.moe_ce_variant)


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
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,  # validate_args filled the default
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
    """(GPTModel for this rank's pipeline stage, the megatron_ce.json record to write next to its
    checkpoints as a dict, or None for a model built from shape flags). Parallel state must be
    initialised. `build_model` also returns the resolved settings."""
    model, settings = build_model(args, tokenizer_len)
    return model, None if settings.record is None else settings.record.to_dict()


def build_model(args, tokenizer_len: int) -> Tuple[torch.nn.Module, ModelSettings]:
    """(GPTModel for this rank's pipeline stage, the settings it was built with); `args` is not changed."""
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
    k_a, variant = resolve_ce(args, source)
    if source is not None:
        model, record = _model_from_record(args, source, k_a, variant, overrides)
        settings = ModelSettings(k_a, variant, int(source.hf_config["vocab_size"]), record)
    else:
        vocab = args.vocab_size or padded_vocab_size(tokenizer_len, args.make_vocab_size_divisible_by,
                                                     args.tensor_model_parallel_size)
        model = _model_from_flags(args, vocab, k_a, variant, overrides)
        settings = ModelSettings(k_a, variant, vocab, None)
    # A vocabulary we padded ourselves (shape flags, no --vocab-size) is right by construction.
    check_tokenizer_vocab(args, tokenizer_len, settings.padded_vocab_size,
                          padded_here=source is None and not args.vocab_size)
    return model, settings


def _model_from_record(args, source: ModelRecord, k_a: int, variant: str,
                       overrides: Dict[str, Any]) -> Tuple[torch.nn.Module, ModelRecord]:
    """A registered model family's GPTModel from its HF config, and the record describing it."""
    from megatron_ce.ce import ConfigError
    from megatron_ce.models.registry import get_family
    from megatron_ce.convert.mapping import ConversionError

    hf = source.hf_config
    try:
        family = get_family(source.model_type or hf.get("model_type"))
        model = family.build_model(hf, moe_ce_num_compressed=k_a, moe_ce_variant=variant,
                                   use_te=args.transformer_impl == "transformer_engine", **overrides)
    except (ConversionError, ConfigError) as e:
        raise ArgError(str(e)) from None
    record = ModelRecord(model_type=family.model_type, hf_config=hf, moe_ce_num_compressed=k_a,
                         moe_ce_variant=variant, dtype="bfloat16" if args.bf16 else "float32")
    return model, record


# Models pad their vocabulary past the tokenizer's size to a multiple of 64 or 128 (OLMoE 50280 ->
# 50304, Phi-3.5-MoE 32011 -> 32064); a larger gap means the tokenizer belongs to another model.
MAX_VOCAB_PADDING = 128


def check_tokenizer_vocab(args, tokenizer_len: int, vocab: int, padded_here: bool = False) -> None:
    tok = args.tokenizer_model
    if tokenizer_len > vocab:
        raise ArgError(f"--tokenizer-model={tok} has {tokenizer_len} tokens but the model's vocabulary has {vocab} "
                       "(--vocab-size / the model config): token ids would index past the embedding")
    if not padded_here and vocab - tokenizer_len >= MAX_VOCAB_PADDING and not args.allow_vocab_padding:
        raise ArgError(f"--tokenizer-model={tok} has {tokenizer_len} tokens but the model's vocabulary has {vocab}, "
                       f"more than padding apart: the tokenizer of another model? (--allow-vocab-padding to accept)")


def _model_from_flags(args, vocab: int, k_a: int, variant: str, overrides: Dict[str, Any]) -> torch.nn.Module:
    """A GPTModel with CE MoE layers from the shape flags (checked against the layout in args.py)."""
    from megatron_ce.models.common import build_gpt_model

    config = _config_from_flags(args, k_a, variant, overrides)
    return build_gpt_model(config, _layer_spec(args, config), dict(
        vocab_size=vocab,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        position_embedding_type="rope",
        rotary_base=int(args.rotary_base or 10000),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        parallel_output=True,
    ))


def _config_from_flags(args, k_a: int, variant: str, overrides: Dict[str, Any]):
    from megatron_ce.ce import CETransformerConfig, ConfigError

    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    try:
        return CETransformerConfig(
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
            moe_ce_num_compressed=k_a,
            moe_ce_variant=variant,
            **overrides,
        )
    except (ConfigError, AssertionError, ValueError) as e:
        raise ArgError(str(e).splitlines()[0] if str(e) else repr(e)) from None


def _layer_spec(args, config):
    from megatron_ce.ce import get_gpt_ce_layer_local_spec, get_gpt_ce_layer_te_spec

    spec_kw = dict(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                   qk_layernorm=bool(args.qk_layernorm))
    if args.transformer_impl == "transformer_engine":
        return get_gpt_ce_layer_te_spec(**spec_kw)
    return get_gpt_ce_layer_local_spec(normalization=config.normalization,
                                       **compat.legacy_grouped_gemm_kwargs(compat.uses_legacy_grouped_gemm(config)),
                                       **spec_kw)
