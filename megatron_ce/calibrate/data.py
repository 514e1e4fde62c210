"""Calibration sequences from an SFT data file (megatron_ce.data) or a plain text file, and this
rank's micro-batches of them."""

import os
from typing import Dict, List, Tuple

import torch

from megatron_ce.calibrate.modes import CalibrationError


def text_sequences(path: str, tokenizer, seq_length: int) -> List[torch.Tensor]:
    """A plain text file as consecutive seq_length-token pieces (the last, shorter piece dropped)."""
    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_length
    return [torch.tensor(ids[i * seq_length:(i + 1) * seq_length], dtype=torch.long) for i in range(n)]


def sft_sequences(args, tokenizer) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(train split, eval split) token sequences of the trainer's SFT dataset built from the flags."""
    from megatron_ce.data import build_sft_dataset_from_args

    train_ds, eval_ds, _stats, _tok = build_sft_dataset_from_args(args, tokenizer)
    take = [train_ds[i]["tokens"] for i in range(min(len(train_ds), args.num_samples + args.holdout_samples))]
    held = [eval_ds[i]["tokens"] for i in range(min(len(eval_ds), args.holdout_samples))] if eval_ds else []
    return take, held


def calibration_sequences(args, tokenizer) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(N calibration sequences, M held-out ones): the held-out ones from the eval split when there is
    one (--eval-split-fraction), else the M sequences after the first N."""
    if os.path.splitext(args.data_path or "")[1] == ".txt":
        train, held = text_sequences(args.data_path, tokenizer, args.seq_length), []
    else:
        train, held = sft_sequences(args, tokenizer)
    n, m = args.num_samples, args.holdout_samples
    if len(held) < m:
        held, train = train[n:n + m], train[:n]
    if len(train) < n or len(held) < m:
        raise CalibrationError(f"--data-path={args.data_path} gives {len(train) + len(held)} sequences of "
                               f"--seq-length={args.seq_length}; --num-samples={n} + --holdout-samples={m} needed")
    return train[:n], held[:m]


def rank_batches(sequences: List[torch.Tensor], micro_batch_size: int, dp_rank: int, dp_size: int,
                 flag: str) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches: micro-batch i goes to rank i mod dp_size. Every rank
    gets the same count (the remainder is dropped): expert-parallel ranks run each forward together."""
    per_rank = len(sequences) // (micro_batch_size * dp_size)
    if per_rank == 0:
        raise CalibrationError(f"{flag}={len(sequences)} is less than --micro-batch-size={micro_batch_size} x "
                               f"data-parallel size {dp_size}")
    out = []
    for j in range(per_rank):
        start = (j * dp_size + dp_rank) * micro_batch_size
        tokens = torch.stack(sequences[start:start + micro_batch_size])
        out.append({"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).clone()})
    return out
