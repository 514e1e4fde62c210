"""Fit of one layer's theta tables: top-k_m + CE output -> full top-k output (MSE, Adam).

Only theta moves. The loss of a step is the squared error summed over every rank's tokens divided by
the global element count, and theta's gradient is summed over the ranks that see different tokens
(calibrate/dist.py), so every replica takes the same step and the result does not depend on the
layout. theta is optimised in fp32 (a master copy; bf16 cannot hold small steps around 1.0,
docs/METHOD.md §1.9) and written back into the tables in their own dtype after each step.
"""

import contextlib
from typing import Callable, List, Optional, Sequence

import torch

from megatron_ce.calibrate.capture import LayerBatch, layer_output
from megatron_ce.calibrate.dist import sum_over, token_groups
from megatron_ce.calibrate.modes import ce_tables


@contextlib.contextmanager
def only_theta_trainable(layer):
    """theta requires grad, the layer's other weights (router, experts) do not; flags restored."""
    tables = {id(p) for p in ce_tables(layer)}
    saved = [(p, p.requires_grad) for p in layer.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in tables)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def squared_error(layer, batch: LayerBatch) -> torch.Tensor:
    """sum((y_ce - y_full)^2) over this rank's rows of the batch, in fp32."""
    out = layer_output(layer, batch.x, batch.kwargs)
    return (out.float() - batch.target.float()).pow(2).sum()


def global_count(batch: LayerBatch, groups) -> torch.Tensor:
    n = torch.tensor(float(batch.target.numel()), dtype=torch.float64, device=batch.target.device)
    return sum_over(n, groups)


def theta_step(layer, tables, masters, optimizer, batch: LayerBatch, groups) -> float:
    """One Adam step on the masters from one batch; returns the step's global MSE (before the step)."""
    sse = squared_error(layer, batch)
    n = global_count(batch, groups)
    loss = sse / n.to(sse.dtype)
    grads = torch.autograd.grad(loss, tables, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(t)).float().reshape(-1)
                      for g, t in zip(grads, tables)])
    sum_over(flat, groups)
    for m, g in zip(masters, flat.split([t.numel() for t in tables])):
        m.grad = g.view_as(m)
    optimizer.step()
    with torch.no_grad():
        for t, m in zip(tables, masters):
            t.copy_(m)
    return float(sum_over(loss.detach().reshape(1).clone(), groups))


def fit_layer(layer, data: Sequence[LayerBatch], steps: int, lr: float,
              on_step: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """`steps` Adam steps over the batches in turn; returns the per-step training MSE."""
    tables = ce_tables(layer)
    masters = [t.detach().float().clone().requires_grad_(True) for t in tables]
    optimizer = torch.optim.Adam(masters, lr=lr)
    groups = token_groups()
    losses = []
    with only_theta_trainable(layer):
        for step in range(steps):
            losses.append(theta_step(layer, tables, masters, optimizer, data[step % len(data)], groups))
            if on_step is not None:
                on_step(step, losses[-1])
    return losses
