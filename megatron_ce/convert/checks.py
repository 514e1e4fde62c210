"""Checks a conversion makes before it writes anything: the source's tensors against what the table
expects (every problem in one error), and an output folder that would be overwritten."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from megatron_ce.convert.mapping import ConversionError

Shapes = Dict[str, Sequence[int]]


def shape_problems(want: Shapes, have: Shapes) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, mis-shaped) tensor names of `have` against `want`, sorted."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    misshaped = sorted(
        f"{n} {list(have[n])} (expected {list(want[n])})"
        for n in set(want) & set(have)
        if tuple(have[n]) != tuple(want[n])
    )
    return missing, unexpected, misshaped


def problems_message(what: str, missing, unexpected, misshaped, extra: Sequence[str] = ()) -> str:
    lines = [f"{what}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}): " + ", ".join(misshaped))
    lines.extend(f"  {x}" for x in extra)
    return "\n".join(lines)


def check_new_checkpoint_dir(ckpt_dir: str) -> None:
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ConversionError(f"{ckpt_dir} already exists and is not empty: remove it or choose another --save-dir")


def check_new_hf_dir(save_dir: str) -> None:
    if os.path.isdir(save_dir) and any(n.endswith(".safetensors") for n in os.listdir(save_dir)):
        raise ConversionError(f"{save_dir} already holds safetensors weights: remove them or choose another --save-dir")
