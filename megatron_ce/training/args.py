"""Command-line flags of `python -m megatron_ce.train` (Megatron-LM names) and their validation.

Every user error is one line naming the flag: `megatron_ce.train: error: --global-batch-size=10 ...`
(`ArgError`, exit code 2). Checks that need the world size run before torch.distributed starts, so a
bad layout fails before any rank waits on a rendezvous.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

from megatron_ce.checkpoint_format import find_record
from megatron_ce.data import add_sft_data_args

PROG = "megatron_ce.train"

# Model-shape flags: given on the command line, or read from --model-config (never both).
MODEL_SHAPE_FLAGS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "moe_ffn_hidden_size", "num_experts", "moe_router_topk", "normalization", "norm_epsilon", "swiglu",
    "disable_bias_linear", "qk_layernorm", "untie_embeddings_and_output_weights", "rotary_base",
    "max_position_embeddings", "vocab_size", "moe_router_pre_softmax",
)


class ArgError(ValueError):
    """A bad flag value; the message is one line and names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise ArgError(message)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description="Supervised fine-tuning of (CE) MoE models on megatron-core.")
    for add in (_add_model_args, _add_moe_args, _add_parallel_args, _add_fusion_args, _add_training_args,
                _add_checkpoint_args, _add_logging_args, add_sft_data_args):
        add(p)
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Model shape (or --model-config) and initialisation."""
    g = p.add_argument_group("model (ignored with --model-config, which gives the whole shape)")
    g.add_argument("--model-config", default=None,
                   help="HF config.json (or its folder) of the model family to build, e.g. an OLMoE config; "
                        "default: megatron_ce.json of a converted checkpoint in --load / --pretrained-checkpoint, "
                        "else the shape flags below")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int, help="GQA groups (default: = heads)")
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--moe-ffn-hidden-size", type=int)
    g.add_argument("--num-experts", type=int)
    g.add_argument("--moe-router-topk", type=int)
    g.add_argument("--moe-router-pre-softmax", action="store_true", default=None,
                   help="softmax over all experts, then top-k, no renormalisation (OLMoE)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"))
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--disable-bias-linear", action="store_true", default=None)
    g.add_argument("--qk-layernorm", action="store_true", default=None, help="per-head QK norm (mcore)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="default: the tokenizer's, padded (--make-vocab-size-divisible-by)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--allow-vocab-padding", action="store_true",
                   help="accept a model vocabulary 128 or more entries larger than the tokenizer's")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    """MoE routing / dispatch and the Compressed Experts settings."""
    g = p.add_argument_group("MoE / Compressed Experts")
    g.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall", "flex"), default="alltoall")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="token dropping: each expert takes at most this factor x its even share of the main "
                        "selections (default: dropless)")
    g.add_argument("--moe-token-drop-policy", choices=("probs", "position"), default="probs")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-grouped-gemm", action="store_true")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="load-balancing loss on the full top-k (default 0: off, as the reference SFT)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-ce-num-compressed", type=int, default=None,
                   help="k_a compressed experts per token (0 = off; default: the checkpoint's / 0)")
    g.add_argument("--moe-ce-variant", choices=("ia3", "hidden"), default=None, help="default: ia3")
    g.add_argument("--moe-ce-split", choices=("fixed", "mass"), default="fixed",
                   help="fixed: k - k_a main experts per token; mass: per token, the shortest ranked "
                        "prefix holding --moe-ce-main-mass of the top-k router mass runs")
    g.add_argument("--moe-ce-main-mass", type=float, default=0.5, help="tau of --moe-ce-split mass")
    g.add_argument("--moe-ce-min-main", type=int, default=None,
                   help="mass split: fewest main experts (default: top-k - k_a, or 1)")
    g.add_argument("--moe-ce-max-main", type=int, default=None,
                   help="mass split: most main experts (default: top-k)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Parallel layout (checked by check_parallel_layout) and communication overlap."""
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective that waits longer on a dead or stuck rank fails (torch's default is 30)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward pass (bucketed)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient-reduction bucket with --overlap-grad-reduce (default: "
                        "megatron-core's, max(40M, 1M x data-parallel size))")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next forward pass "
                        "(needs --use-distributed-optimizer and --overlap-grad-reduce)")


def _add_fusion_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's kernel fusions (resolved against the installed kernels in model.py)."""
    g = p.add_argument_group("fusions (Megatron-LM's; on where the kernel is available, else off with a note)")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="fused (bias +) SwiGLU activation of the MLPs and CE experts")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false",
                   help="fused scale + mask + softmax of --transformer-impl local attention (bf16)")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                   help="weight-gradient GEMMs accumulate straight into the fp32 main grads")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="Transformer Engine's fused token permute/unpermute (off by default; not with "
                        "--moe-ce-split mass)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused vocab-parallel cross entropy (off by default)")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """Batch sizes, schedule, optimizer, precision, recompute."""
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None, help="instead of --train-iters: passes over the train split")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"),
                   default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="of --lr-decay-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="default 0 (the reference SFT); never applied to biases, 1-D parameters or the CE "
                        "theta tables (their neutral value is 1, not 0)")
    g.add_argument("--moe-ce-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the compressed-expert theta tables (whole schedule)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    g.add_argument("--bf16", action="store_true", help="bf16 model, fp32 master weights and grads")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="activation recompute (full: whole layers; selective: attention core)")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Save / resume / retention (training/checkpoint_manager.py)."""
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint folder (iter_XXXXXXX/ + latest_checkpointed_iteration.txt)")
    g.add_argument("--load", default=None,
                   help="resume from this folder's latest checkpoint (weights only if it is a converted "
                        "'release' checkpoint or the layout changed); default: --save when it has one")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="weights to start from when there is nothing to resume (e.g. a converted HF model)")
    g.add_argument("--finetune", action="store_true", help="load weights only from --load; iteration 0")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (or --exit-signal), finish the current iteration, save a checkpoint and exit 0")
    g.add_argument("--exit-signal", default="SIGTERM", help="the signal --exit-signal-handler catches")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last-checkpoints", type=int, default=None,
                   help="after each save, delete older iter_* checkpoints beyond the newest N (default: keep "
                        "all); the one latest_checkpointed_iteration.txt names is always kept")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    """TensorBoard, log and eval intervals."""
    g = p.add_argument_group("logging / eval")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=None, help="global batches per eval (default: the whole split)")


def parse_args(argv: Optional[List[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate; raises ArgError (one line naming the flag)."""
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args


def _need(ok: bool, msg: str):
    if not ok:
        raise ArgError(msg)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Checks that need no model/data, in a fixed order (the first failing one is reported); fills the
    derived fields (data_parallel_size, world_size, num_microbatches, global_batch_size and
    expert_tensor_parallel_size defaults), as Megatron-LM's validate_args does."""
    _check_positive(args)
    dp = check_parallel_layout(args, world_size)
    _check_batch(args, dp)
    _check_run_length(args)
    _check_optimizer(args)
    _check_moe_and_checkpoints(args)
    _check_inputs(args)
    _check_gpu_features(args)
    _check_model_source(args)
    k_a = args.moe_ce_num_compressed
    _need(k_a is None or k_a >= 0, f"--moe-ce-num-compressed={k_a} must be >= 0")
    args.data_parallel_size = dp
    args.world_size = world_size
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    args.expert_tensor_parallel_size = args.expert_tensor_parallel_size or args.tensor_model_parallel_size


def _check_positive(args) -> None:
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "micro_batch_size", "seq_length", "log_interval"):
        _need(getattr(args, name) >= 1, f"{_flag(name)}={getattr(args, name)} must be >= 1")
    for name in ("expert_tensor_parallel_size", "ddp_bucket_size", "global_batch_size", "train_iters", "save_interval",
                 "eval_interval", "eval_iters", "lr_decay_iters"):
        v = getattr(args, name)
        _need(v is None or v >= 1, f"{_flag(name)}={v} must be >= 1")


def check_parallel_layout(args, world_size: int) -> int:
    """The one check of the TP/PP/EP/ETP layout against the world size and the sequence (the model
    shape's divisibility by it: _check_shape_fits_layout). Returns the data-parallel size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    _need(world_size % (tp * pp) == 0,
          f"--tensor-model-parallel-size={tp} x --pipeline-model-parallel-size={pp} does not divide the "
          f"world size {world_size}")
    dp = world_size // (tp * pp)
    _need((tp * dp) % (ep * etp) == 0,
          f"--expert-model-parallel-size={ep} x --expert-tensor-parallel-size={etp} must divide "
          f"tensor x data parallel = {tp * dp} (world size {world_size})")
    _need(tp == 1 or args.sequence_parallel,
          f"--tensor-model-parallel-size={tp} with MoE requires --sequence-parallel")
    _need(not args.sequence_parallel or args.seq_length % tp == 0,
          f"--seq-length={args.seq_length} must be divisible by --tensor-model-parallel-size={tp} "
          "(--sequence-parallel)")
    return dp


def _check_batch(args, dp: int) -> None:
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _need(args.global_batch_size % (args.micro_batch_size * dp) == 0,
          f"--global-batch-size={args.global_batch_size} must be divisible by --micro-batch-size="
          f"{args.micro_batch_size} x data-parallel size {dp}")


def _check_run_length(args) -> None:
    import signal

    _need((args.train_iters is None) != (args.epochs is None), "give exactly one of --train-iters and --epochs")
    _need(args.epochs is None or args.epochs > 0, f"--epochs={args.epochs} must be > 0")
    _need(args.distributed_timeout_minutes > 0,
          f"--distributed-timeout-minutes={args.distributed_timeout_minutes} must be > 0")
    _need(isinstance(getattr(signal, str(args.exit_signal).upper(), None), signal.Signals),
          f"--exit-signal={args.exit_signal} is not a signal name (e.g. SIGTERM, SIGUSR1)")


def _check_optimizer(args) -> None:
    _need(args.lr >= 0 and args.min_lr >= 0, "--lr and --min-lr must be >= 0")
    _need(args.min_lr <= args.lr, f"--min-lr={args.min_lr} must be <= --lr={args.lr}")
    _need(args.lr_warmup_fraction is None or 0.0 <= args.lr_warmup_fraction < 1.0,
          f"--lr-warmup-fraction={args.lr_warmup_fraction} must be in [0, 1)")
    _need(args.lr_warmup_fraction is None or args.lr_warmup_iters == 0,
          "give only one of --lr-warmup-fraction and --lr-warmup-iters")
    _need(args.clip_grad >= 0, f"--clip-grad={args.clip_grad} must be >= 0")
    _need(args.weight_decay >= 0, f"--weight-decay={args.weight_decay} must be >= 0")
    _need(args.moe_ce_lr_mult > 0, f"--moe-ce-lr-mult={args.moe_ce_lr_mult} must be > 0")


def _check_moe_and_checkpoints(args) -> None:
    _need(args.moe_aux_loss_coeff >= 0, f"--moe-aux-loss-coeff={args.moe_aux_loss_coeff} must be >= 0")
    _need(args.moe_expert_capacity_factor is None or args.moe_expert_capacity_factor > 0,
          f"--moe-expert-capacity-factor={args.moe_expert_capacity_factor} must be > 0")
    _need(not args.moe_pad_expert_input_to_capacity or args.moe_expert_capacity_factor is not None,
          "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    _need(args.save_interval is None or args.save, "--save-interval needs --save")
    _need(not args.overlap_param_gather or args.use_distributed_optimizer,
          "--overlap-param-gather needs --use-distributed-optimizer (it overlaps that optimizer's all-gather)")
    _need(not args.overlap_param_gather or args.overlap_grad_reduce,
          "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    _need(args.keep_last_checkpoints is None or args.keep_last_checkpoints >= 1,
          f"--keep-last-checkpoints={args.keep_last_checkpoints} must be >= 1")
    _need(args.keep_last_checkpoints is None or args.save, "--keep-last-checkpoints needs --save")
    _need(args.moe_token_dispatcher_type != "flex",
          "--moe-token-dispatcher-type=flex needs DeepEP (GPU); use alltoall or allgather")


def _check_inputs(args) -> None:
    _need(args.finetune is False or args.load, "--finetune needs --load")
    _need(args.data_path or args.task, "--data-path (or --task) is required")
    _need(args.tokenizer_model, "--tokenizer-model is required")
    _need(args.recompute_granularity != "full" or args.recompute_method,
          "--recompute-granularity=full needs --recompute-method (uniform or block) and --recompute-num-layers")
    if args.recompute_method and args.recompute_num_layers is None:
        args.recompute_num_layers = 1


def _check_gpu_features(args) -> None:
    import torch

    _need(not args.moe_permute_fusion or (torch.cuda.is_available() and module_available("transformer_engine")),
          "--moe-permute-fusion needs a GPU and Transformer Engine >= 2.1 (fused permute kernels)")
    _need(not args.cross_entropy_loss_fusion or torch.cuda.is_available(),
          "--cross-entropy-loss-fusion needs a GPU")
    _need(not args.bf16 or torch.cuda.is_available(),
          "--bf16 needs a GPU here (megatron-core 0.16.1's mixed-precision optimizer accepts only "
          "torch.cuda tensors); train in fp32 on CPU")


def module_available(module: str) -> bool:
    """Is `module` installed (without importing it)?"""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_model_source(args) -> None:
    """The model shape comes from exactly one place: --model-config, a megatron_ce.json record, or the
    shape flags."""
    record = model_record_path(args)
    if args.model_config is None and record is None:
        _check_shape_flags(args)
        _check_shape_fits_layout(args)
        return
    given = [_flag(n) for n in MODEL_SHAPE_FLAGS if getattr(args, n) is not None]
    source = "--model-config" if args.model_config else record
    _need(not given, f"{given[0] if given else ''} conflicts with {source} (the model shape comes from it)")


def _check_shape_flags(args) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_router_topk"):
        _need(getattr(args, name) is not None, f"{_flag(name)} is required (or --model-config)")


def _check_shape_fits_layout(args) -> None:
    """The shape flags' divisibility by the parallel layout (and the router's own limits)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep = args.expert_model_parallel_size
    _need(args.num_layers % pp == 0,
          f"--num-layers={args.num_layers} must be divisible by --pipeline-model-parallel-size={pp}")
    _need(args.num_attention_heads % tp == 0,
          f"--num-attention-heads={args.num_attention_heads} must be divisible by --tensor-model-parallel-size={tp}")
    _need(args.hidden_size % args.num_attention_heads == 0,
          f"--hidden-size={args.hidden_size} must be divisible by --num-attention-heads={args.num_attention_heads}")
    _need(args.num_experts % ep == 0,
          f"--num-experts={args.num_experts} must be divisible by --expert-model-parallel-size={ep}")
    _need(1 <= args.moe_router_topk <= args.num_experts,
          f"--moe-router-topk={args.moe_router_topk} must be in [1, --num-experts={args.num_experts}]")
    k_a = args.moe_ce_num_compressed or 0
    _need(k_a < args.moe_router_topk,
          f"--moe-ce-num-compressed={k_a} must be < --moe-router-topk={args.moe_router_topk} "
          "(at least one main expert per token)")
    _need(args.vocab_size is None or args.vocab_size % tp == 0,
          f"--vocab-size={args.vocab_size} must be divisible by --tensor-model-parallel-size={tp}")


def model_record_path(args) -> Optional[str]:
    """megatron_ce.json (model family + HF config), written by the converter and by our saves of models
    built from an HF config: in --load, then --save (resume), then --pretrained-checkpoint."""
    return find_record(args.load, args.save, args.pretrained_checkpoint)


def train_iters_from_epochs(args, num_train_samples: int) -> int:
    return max(1, math.ceil(args.epochs * num_train_samples / args.global_batch_size))


def exit_on_arg_error(e: Exception) -> None:
    print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
