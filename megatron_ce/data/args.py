"""Command-line flags for the SFT data pipeline (for the training entry point).

Adds only data-specific flags; ``--seq-length`` and ``--seed`` are read from the training parser's
own Megatron flags (``args.seq_length``, ``args.seed``).
"""

from __future__ import annotations

import argparse

from .dataset import FORMATS, PACKING_MODES, build_sft_dataset, load_tokenizer
from .sources import TASK_PRESETS

__all__ = ["add_sft_data_args", "build_sft_dataset_from_args"]


def add_sft_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("SFT data")
    g.add_argument("--data-path", default=None,
                   help="local .jsonl/.json/.parquet file or folder, or a hub dataset name "
                        "(default: the --task preset's hub dataset)")
    g.add_argument("--task", choices=sorted(TASK_PRESETS), default=None,
                   help="paper presets: math=TIGER-Lab/MathInstruct, coding=ise-uiuc/Magicoder-Evol-Instruct-110K, "
                        "general=allenai/tulu-3-sft-mixture (first user/assistant pair)")
    g.add_argument("--tokenizer-model", default=None, help="tokenizer folder or hub name (transformers AutoTokenizer)")
    g.add_argument("--sft-format", choices=FORMATS, default="alpaca",
                   help="alpaca: the reference prompt, loss on all tokens; chat: chat template, assistant-only loss")
    g.add_argument("--sft-packing", choices=PACKING_MODES, default=None,
                   help="reference: concatenate + chunk, attention crosses samples (the paper; default for alpaca); "
                        "boundary: whole samples, position reset, block-diagonal attention (default for chat); "
                        "none: one padded sample per sequence")
    g.add_argument("--sft-loss-on", choices=("all", "response"), default=None,
                   help="alpaca format: loss on all tokens (default, reference) or the response only")
    g.add_argument("--chat-template", default=None, help="Jinja chat template string or .jinja file")
    g.add_argument("--eval-split-fraction", type=float, default=0.0,
                   help="fraction of rows held out for eval (chosen by --seed)")
    g.add_argument("--data-max-rows", type=int, default=None, help="read at most this many rows")
    return parser


def build_sft_dataset_from_args(args, tokenizer=None):
    """``build_sft_dataset`` from parsed flags; returns ``(train_ds, eval_ds, stats, tokenizer)``."""
    if tokenizer is None:
        if not args.tokenizer_model:
            raise ValueError("--tokenizer-model is required")
        tokenizer = load_tokenizer(args.tokenizer_model)
    train_ds, eval_ds, stats = build_sft_dataset(
        args.data_path, tokenizer, args.seq_length, fmt=args.sft_format, packing=args.sft_packing,
        task=args.task, split_eval=args.eval_split_fraction, seed=args.seed, loss_on=args.sft_loss_on,
        chat_template=args.chat_template, max_rows=args.data_max_rows)
    return train_ds, eval_ds, stats, tokenizer
