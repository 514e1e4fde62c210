"""Sequence packing and the attention structure of packed rows.

Packing modes (``packing=``):

* ``"reference"`` – the paper's reference (TRL ``packing=True``): all samples are concatenated into
  one token stream (each ends with its EOS, no other separator) and cut into consecutive
  ``seq_length`` chunks. Position ids run 0..seq_length-1 per chunk and attention crosses samples
  (one document per chunk); a sample may be split over two chunks. As in Hugging Face models the
  last position of each chunk has no target. The last chunk is padded.
* ``"boundary"`` – whole samples are packed into rows of ``seq_length`` (best-fit decreasing, rows
  then shuffled by seed); position ids restart at 0 for every sample, and each sample is its own
  document: ``document_ids`` (per token) / ``cu_seqlens`` describe the boundaries and
  :func:`packed_attention_mask` builds the block-diagonal causal mask so no token attends across a
  boundary. The last token of each sample has no target.
* ``"none"`` – one sample per row, right-padded.

Padding tokens get document id -1 (their own block, so their attention rows are never empty) and are
never loss targets.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence

import numpy as np
import torch

__all__ = [
    "best_fit_decreasing",
    "packed_attention_mask",
    "cu_seqlens_from_document_ids",
    "unpad_cu_seqlens",
]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Pack items (by length, each ≤ capacity) into bins of `capacity`: longest first, each into the
    fullest bin it fits. Ties keep input order, so the result is deterministic. O(n log capacity)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError("every length must be in [1, capacity]")
    order = np.argsort(-lengths, kind="stable")
    bins: List[List[int]] = []
    buckets = {}  # remaining capacity -> stack of bin ids
    caps: List[int] = []  # sorted remaining capacities that have a non-empty bucket
    for idx in order.tolist():
        n = int(lengths[idx])
        k = bisect.bisect_left(caps, n)
        if k == len(caps):
            b, c = len(bins), capacity
            bins.append([])
        else:
            c = caps[k]
            stack = buckets[c]
            b = stack.pop()
            if not stack:
                del buckets[c]
                caps.pop(k)
        bins[b].append(idx)
        r = c - n
        if r > 0:
            if r not in buckets:
                buckets[r] = []
                bisect.insort(caps, r)
            buckets[r].append(b)
    return bins


def packed_attention_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Block-diagonal (causal) attention mask from per-token document ids.

    `document_ids`: ``[s]`` or ``[b, s]`` integers (as the dataset returns; padding = -1).
    Returns a bool tensor ``[b, 1, s, s]`` in the Megatron convention, ``True`` = masked out:
    query i may attend key j only if both are in the same document (and j ≤ i when `causal`).
    """
    d = torch.as_tensor(document_ids)
    if d.dim() == 1:
        d = d.unsqueeze(0)
    mask = d[:, :, None] != d[:, None, :]
    if causal:
        s = d.shape[-1]
        mask = mask | torch.ones(s, s, dtype=torch.bool, device=d.device).triu_(1)
    return mask.unsqueeze(1)


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment boundaries ``[0, len_0, len_0+len_1, ..., s]`` (int32) of one row's
    ``document_ids`` ``[s]`` (padding is its own last segment)."""
    d = torch.as_tensor(document_ids).reshape(-1)
    change = torch.nonzero(d[1:] != d[:-1]).reshape(-1) + 1
    zero = torch.zeros(1, dtype=torch.long, device=d.device)
    end = torch.full((1,), d.numel(), dtype=torch.long, device=d.device)
    return torch.cat([zero, change, end]).to(torch.int32)


def unpad_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Drop the -1 fill of a dataset row's fixed-size ``cu_seqlens`` ([s+1] -> [n_segments+1])."""
    cu = torch.as_tensor(cu_seqlens).reshape(-1)
    return cu[cu >= 0]
