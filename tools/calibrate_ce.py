#!/usr/bin/env python
"""Calibrate the compressed-expert tables theta of a checkpoint before SFT (docs/METHOD.md,
"Calibrating theta"): fit each CE layer's theta so that its top-k_m + CE output matches its full
top-k output on N sequences, then write a weights-only checkpoint in the converter's release layout.

    python tools/calibrate_ce.py --load CKPT --save OUT --data-path FILE --tokenizer-model TOK \
        [--num-samples N] [--holdout-samples M] [--calib-steps S] [--calib-lr LR] [--calib-layers 0,3] \
        [--tensorboard-dir D] [trainer model / parallel flags, e.g. --moe-ce-num-compressed 4 --seq-length 1024]

FILE: an SFT data file (the trainer's --sft-format / --sft-packing apply) or a plain .txt file (cut
into --seq-length pieces). Runs under torchrun with the trainer's parallel flags (gloo on CPU).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = "tools/calibrate_ce.py"


def build_parser():
    """The trainer's parser (model, MoE/CE, parallel, data flags) plus the calibration flags."""
    from megatron_ce.training.args import build_parser as trainer_parser

    p = trainer_parser()
    p.prog = f"python {PROG}"
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("calibration")
    g.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    g.add_argument("--holdout-samples", type=int, default=16,
                   help="held-out sequences (eval split when there is one): errors and LM losses, and a layer "
                        "whose fit is worse there keeps its theta (0: none)")
    g.add_argument("--calib-steps", type=int, default=200, help="Adam steps per layer")
    g.add_argument("--calib-lr", type=float, default=1e-2)
    g.add_argument("--calib-layers", default=None, help="comma-separated 0-based MoE layer indices (default: all)")
    g.add_argument("--calib-keep-if-worse", action="store_true",
                   help="keep a layer's fitted theta even when its held-out error is worse than before")
    p.set_defaults(train_iters=1)  # the trainer's checks want a run length; calibration has none
    return p


def parse_args(argv=None):
    from megatron_ce.training.args import ArgError, validate_args

    args = build_parser().parse_args(argv)
    for flag, ok in (("--load", bool(args.load)), ("--save", bool(args.save)),
                     ("--num-samples", args.num_samples >= 1), ("--holdout-samples", args.holdout_samples >= 0),
                     ("--calib-steps", args.calib_steps >= 0), ("--calib-lr", args.calib_lr > 0)):
        if not ok:
            raise ArgError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))} is missing or out of range")
    args.calib_layer_set = _layer_set(args.calib_layers)
    validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    return args


def _layer_set(text):
    from megatron_ce.training.args import ArgError

    if text is None:
        return None
    try:
        return {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise ArgError(f"--calib-layers={text} must be comma-separated layer indices, e.g. 0,3") from None


def load_model(args, tokenizer):
    """The trainer's model for this rank, weights from --load (converted or trained checkpoint)."""
    import torch

    from megatron_ce.calibrate import CalibrationError
    from megatron_ce.training.checkpoint import find_checkpoint, load_model_weights
    from megatron_ce.training.model import model_provider

    ckpt = find_checkpoint(args.load)
    if ckpt is None:
        raise CalibrationError(f"--load={args.load} holds no checkpoint (no latest_checkpointed_iteration.txt)")
    model, record = model_provider(args, len(tokenizer))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    load_model_weights(model, ckpt)
    return model, record, ckpt


def rank_data(args, tokenizer):
    from megatron.core import parallel_state as ps

    from megatron_ce.calibrate.data import calibration_sequences, rank_batches

    train, held = calibration_sequences(args, tokenizer)
    r, n = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = args.micro_batch_size
    batches = rank_batches(train, mbs, r, n, "--num-samples")
    holdout = rank_batches(held, mbs, r, n, "--holdout-samples") if held else None
    return batches, holdout


def run(args):
    from megatron_ce.calibrate import calibrate_ce_model
    from megatron_ce.runtime.parallel import is_rank0
    from megatron_ce.calibrate.save import check_save_dir, output_record, save_calibrated
    from megatron_ce.data.dataset import load_tokenizer

    check_save_dir(args.save)
    tokenizer = load_tokenizer(args.tokenizer_model, chat_template=args.chat_template)
    model, record, ckpt = load_model(args, tokenizer)
    batches, holdout = rank_data(args, tokenizer)
    writer = _writer(args.tensorboard_dir) if is_rank0() else None
    result = calibrate_ce_model(model, batches, layers=args.calib_layer_set, steps=args.calib_steps, lr=args.calib_lr,
                                holdout_batches=holdout, progress=True, writer=writer,
                                keep_if_worse=args.calib_keep_if_worse)
    if is_rank0():
        print(result.table(), flush=True)
    summary = result.to_dict()
    calibration = dict(data_path=args.data_path, num_samples=args.num_samples, holdout_samples=args.holdout_samples,
                       seq_length=args.seq_length, steps=args.calib_steps, lr=args.calib_lr, source=ckpt,
                       layers=sorted(args.calib_layer_set) if args.calib_layer_set is not None else "all",
                       error_data=summary["error_data"], per_layer=summary["layers"],
                       heldout_loss=summary["heldout_loss"])
    out = save_calibrated(model, args.save, args.load, ckpt, output_record(record, args.load, ckpt, calibration), calibration)
    if is_rank0():
        print(f"calibrated checkpoint written to {out}", flush=True)
    if writer is not None:
        writer.close()
    return result


def _writer(log_dir):
    if not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def main(argv=None) -> int:
    from megatron_ce.calibrate import CalibrationError
    from megatron_ce.checkpoint_format import FormatError, one_line
    from megatron_ce.training.args import ArgError
    from megatron_ce.training.checkpoint import CheckpointError

    try:
        args = parse_args(argv)
    except ArgError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    from megatron_ce.runtime import destroy_parallel, init_parallel

    init_parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                  ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size, seed=args.seed,
                  timeout_s=args.distributed_timeout_minutes * 60)
    try:
        run(args)
    except (ArgError, CalibrationError, CheckpointError, FormatError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
