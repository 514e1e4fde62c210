"""One training or eval step over a global batch: this data-parallel rank's micro-batches through
megatron-core's forward/backward schedule (pipeline aware, gradient accumulation over micro-batches,
grads finalized over DP/TP/PP), with the loss summed as [loss sum, token count] over the world.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Dict, List

import torch

from megatron_ce.training.data import batch_to_device, eval_microbatches, model_device


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of the masked per-token losses and the token count: megatron-core divides the gradients by
    the global token count (calculate_per_token_loss), so loss = sum(loss*mask) / sum(mask) over the
    whole global batch."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def loss_sums(device) -> torch.Tensor:
    """[loss sum, token count] accumulator; float64 so long runs do not lose tokens."""
    return torch.zeros(2, dtype=torch.float64, device=device)


def forward_step(data_iterator, model):
    # One micro-batch at a time on the model's device (all of them at once could be large: the
    # boundary-packing attention masks are [mbs, 1, s, s]).
    b = batch_to_device(next(data_iterator), model_device(model))
    output = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
    return output, partial(loss_func, b["loss_mask"])


def run_schedule(model, microbatches: List[Dict], args, forward_only: bool) -> torch.Tensor:
    """Forward (+ backward) over the micro-batches; returns [loss sum, tokens] summed over the world
    (every rank gets it; only last-stage ranks contribute), on the model's device: no host sync here."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only)
    from megatron.core import parallel_state as ps

    local = loss_sums(model_device(model))
    # Last-stage TP ranks all hold the full loss: count one of them.
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for d in out:
            local += d["lm loss"].double()
    torch.distributed.all_reduce(local)
    return local


def evaluate(model, eval_ds, args) -> torch.Tensor:
    """[loss sum, token count] over the eval split, on the model's device."""
    model.eval()
    n_batches = math.ceil(len(eval_ds) / args.global_batch_size)
    if args.eval_iters:
        n_batches = min(n_batches, args.eval_iters)
    total = loss_sums(model_device(model))
    with torch.no_grad():
        for i in range(n_batches):
            total += run_schedule(model, eval_microbatches(eval_ds, i, args), args, forward_only=True)
    model.train()
    return total


def mean_loss(sums: torch.Tensor) -> float:
    """loss sum / tokens as a Python float (a host sync: only where the value is needed)."""
    loss_sum, tokens = sums.tolist()
    return loss_sum / tokens if tokens > 0 else math.nan
