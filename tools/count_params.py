#!/usr/bin/env python
"""Total and active parameters per token of OLMoE / Phi-MoE with and without Compressed Experts.

Fixed split (exact): counts come from the megatron-core model built on the meta device (no memory);
beside them the paper's formula and figures (arXiv 2503.00634: Phi-MoE 7.45B -> 4.93B, -33.8%;
OLMoE 1.28B -> 878M, -31.4%).

  python tools/count_params.py --model olmoe
  python tools/count_params.py --model phimoe --json
  python tools/count_params.py --model path/to/config.json --moe-router-topk 4 --moe-ce-num-compressed 2

Adaptive split (--moe-ce-split mass, measured): the number of main experts varies per token, so the
active count is an expectation over tokens. It needs router probabilities, hence a checkpoint and a
data sample: the model is built and loaded exactly as `python -m megatron_ce.train` would (every flag
this tool does not know is passed to the trainer's parser: shape flags of a model trained from flags,
--seq-length, --sft-format, --micro-batch-size, ...), the first --num-samples sequences of the data are
run forward, and per MoE layer the mean and distribution of main experts per token k_m are reported,
with  E[active] = dense + sum_layers (E[k_m] * expert + (k - E[k_m]) * compressed expert).

  python tools/count_params.py --moe-ce-split mass --moe-ce-main-mass 0.7 --load runs/sft \\
      --data-path examples/data/sft_tiny.jsonl --tokenizer-model examples/data/tokenizer --seq-length 256
  python tools/count_params.py --moe-ce-split mass --moe-ce-main-mass 0.8 --hf-model path/to/hf_model \\
      --data-path data.jsonl --tokenizer-model path/to/hf_model --num-samples 128 --json

--load takes a trainer --save folder or a converted checkpoint; --hf-model converts an HF model folder
into a temporary Megatron checkpoint first (tools/convert_hf_to_megatron.py, the same converter).
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # unknown flags go to the trainer: no prefix guessing
    ap.add_argument("--model", default=None, help="olmoe | phimoe | PATH/config.json (fixed split, exact)")
    ap.add_argument("--moe-router-topk", type=int, default=None, help="k (default: the config's)")
    ap.add_argument("--moe-ce-num-compressed", type=int, default=None,
                    help="k_a compressed experts among the top-k (fixed default: k/2)")
    ap.add_argument("--moe-ce-variant", choices=("ia3", "hidden"), default=None, help="default: ia3")
    ap.add_argument("--moe-ce-split", choices=("fixed", "mass"), default="fixed")
    ap.add_argument("--moe-ce-main-mass", type=float, default=None, help="tau of the mass split")
    ap.add_argument("--moe-ce-min-main", type=int, default=None)
    ap.add_argument("--moe-ce-max-main", type=int, default=None)
    ap.add_argument("--load", default=None, help="measured mode: Megatron checkpoint folder")
    ap.add_argument("--hf-model", default=None, help="measured mode: HF model folder (converted on the fly)")
    ap.add_argument("--num-samples", type=int, default=64, help="measured mode: sequences of the data to run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args, rest = ap.parse_known_args(argv)
    measured = bool(args.load or args.hf_model)
    if args.load and args.hf_model:
        ap.error("give one of --load and --hf-model")
    if args.moe_ce_split == "mass" and not measured:
        ap.error("--moe-ce-split mass is measured on data: give --load or --hf-model, --data-path and "
                 "--tokenizer-model")
    if not measured:
        if args.model is None:
            ap.error("--model is required (or --load / --hf-model for a measured count)")
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.model is not None:
        ap.error("--model is for the exact fixed-split count; a measured count takes its model from the "
                 "checkpoint (or the trainer's --model-config / shape flags)")
    return args, rest, measured


def trainer_argv(args, rest, load_dir):
    """The trainer's command line for this model: its own flags plus the CE flags given here."""
    argv = list(rest) + ["--load", load_dir, "--train-iters", "1", "--moe-ce-split", args.moe_ce_split]
    for flag in ("moe_router_topk", "moe_ce_num_compressed", "moe_ce_variant", "moe_ce_main_mass",
                 "moe_ce_min_main", "moe_ce_max_main"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    return argv


def measure(args, rest, load_dir):
    """Build, load and run the model as the trainer does; returns the expected-cost dict."""
    from megatron_ce.data import build_sft_dataset_from_args
    from megatron_ce.paper.params import expected_cost, unpadded_batches
    from megatron_ce.runtime import init_parallel
    from megatron_ce.training import checkpoint as ckpt
    from megatron_ce.training.args import parse_args
    from megatron_ce.training.model import model_provider

    targs = parse_args(trainer_argv(args, rest, load_dir), world_size=1)
    init_parallel(seed=targs.seed)
    train_ds, _, _, tokenizer = build_sft_dataset_from_args(targs)
    gpt, _ = model_provider(targs, len(tokenizer))
    path = ckpt.find_checkpoint(load_dir)
    if path is None:
        raise ckpt.CheckpointError(f"{load_dir} holds no checkpoint ({ckpt.TRACKER} missing)")
    ckpt.load_model_weights(gpt, path)
    batches = unpadded_batches(train_ds, args.num_samples, targs.micro_batch_size)
    return expected_cost(gpt, batches, meta=dict(checkpoint=path, data=targs.data_path or targs.task,
                                                 num_samples=min(args.num_samples, len(train_ds))))


def main(argv=None):
    args, rest, measured = parse(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    from megatron_ce.runtime import destroy_parallel, init_parallel

    if measured:
        from megatron_ce.paper.params import format_expected_report

        with tempfile.TemporaryDirectory(prefix="count_params_") as tmp:
            load_dir = args.load
            if args.hf_model:  # before init_parallel: the converter sets up its own world-1 state
                from megatron_ce.convert.engine import convert_hf_to_megatron

                load_dir = os.path.join(tmp, "megatron")
                with contextlib.redirect_stdout(sys.stderr):
                    convert_hf_to_megatron(args.hf_model, load_dir, progress=False)
            from megatron_ce.ce import ConfigError
            from megatron_ce.training.args import ArgError
            from megatron_ce.training.checkpoint import CheckpointError

            try:  # the data pipeline and loader report on stdout; keep it for the result (--json)
                with contextlib.redirect_stdout(sys.stderr):
                    res = measure(args, rest, load_dir)
            except (ArgError, ConfigError, CheckpointError) as e:
                sys.exit(f"count_params.py: error: {e}")
            finally:
                destroy_parallel()
        print(json.dumps(res, indent=1) if args.json else format_expected_report(res))
        return

    from megatron_ce.paper.configs import load_model_config
    from megatron_ce.paper.params import count_params, format_report

    family, cfg = load_model_config(args.model)
    topk = args.moe_router_topk or int(cfg["num_experts_per_tok"])
    k_a = topk // 2 if args.moe_ce_num_compressed is None else args.moe_ce_num_compressed
    init_parallel()
    try:
        res = count_params(family, cfg, topk=topk, k_a=k_a, variant=args.moe_ce_variant or "ia3")
    finally:
        destroy_parallel()
    print(json.dumps(res, indent=1) if args.json else format_report(res))


if __name__ == "__main__":
    main()
