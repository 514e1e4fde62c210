"""Global-batch sampling that depends only on (seed, consumed samples), never on the parallel layout.

Global sample g (g = 0, 1, ...) is row `perm_e[g % N]` of the train split, e = g // N its epoch and
perm_e a permutation seeded by (seed, e). Iteration i uses samples [i*G, (i+1)*G) (G = global batch);
data-parallel rank r takes the r-th contiguous slice of G/dp and cuts it into micro-batches. The loss
is a token mean over the whole global batch, so any TP/PP/EP/DP layout sees the same batch and the
same loss; resuming needs only the consumed-sample count.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from megatron_ce.data import packed_attention_mask


class GlobalBatchSampler:
    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the train split is empty")
        self.n = num_samples
        self.seed = seed
        self._perm_epoch, self._perm = None, None

    def index(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def epoch(self, g: int) -> float:
        return g / self.n


def collate(items: List[Dict[str, torch.Tensor]], with_mask: bool) -> Dict[str, torch.Tensor]:
    b = {k: torch.stack([it[k] for it in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    # Block-diagonal causal mask (True = masked) so no token attends across packed samples.
    b["attention_mask"] = packed_attention_mask(torch.stack([it["document_ids"] for it in items])) if with_mask else None
    if torch.cuda.is_available():  # page-locked, so the copy to the GPU can overlap the previous step
        b = {k: None if v is None else v.pin_memory() for k, v in b.items()}
    return b


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the trainer runs on: where the model's parameters live (every pipeline stage holds
    some); the current CUDA device (or the CPU) for a model without parameters. Batches, loss sums and
    their all-reduces all use it, so the code path is the same on CPU and GPU."""
    p = next(model.parameters(), None)
    if p is not None:
        return p.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def batch_to_device(batch: Dict[str, Optional[torch.Tensor]], device: torch.device) -> Dict[str, Optional[torch.Tensor]]:
    """Every tensor of a micro-batch on `device` (asynchronous from pinned memory)."""
    return {k: None if v is None else v.to(device, non_blocking=v.is_pinned()) for k, v in batch.items()}


def train_microbatches(dataset, sampler: GlobalBatchSampler, consumed: int, args) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of the global batch starting at sample `consumed`."""
    from megatron.core import parallel_state as ps

    per_rank = args.global_batch_size // args.data_parallel_size
    start = consumed + ps.get_data_parallel_rank() * per_rank
    idx = [sampler.index(start + j) for j in range(per_rank)]
    mbs, with_mask = args.micro_batch_size, needs_attention_mask(dataset)
    return [collate([dataset[i] for i in idx[m:m + mbs]], with_mask) for m in range(0, per_rank, mbs)]


def eval_microbatches(dataset, batch: int, args) -> List[Dict[str, torch.Tensor]]:
    """Eval global batch `batch` (fixed order); slots past the end repeat row 0 with loss_mask 0, so
    every rank runs the same number of micro-batches (the MoE collectives need it)."""
    from megatron.core import parallel_state as ps

    per_rank = args.global_batch_size // args.data_parallel_size
    start = batch * args.global_batch_size + ps.get_data_parallel_rank() * per_rank
    items = []
    for g in range(start, start + per_rank):
        it = dict(dataset[g if g < len(dataset) else 0])
        if g >= len(dataset):
            it["loss_mask"] = torch.zeros_like(it["loss_mask"])
        items.append(it)
    mbs, with_mask = args.micro_batch_size, needs_attention_mask(dataset)
    return [collate(items[m:m + mbs], with_mask) for m in range(0, per_rank, mbs)]


def needs_attention_mask(dataset) -> bool:
    """Only boundary packing puts several documents in a row; reference packing attends across
    samples on purpose (the paper) and padded rows need only the causal mask."""
    return getattr(dataset, "packing", None) == "boundary"
