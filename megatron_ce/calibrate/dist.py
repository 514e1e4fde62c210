"""Reductions over the ranks that see different tokens, the way training reduces the theta tables.

theta is a replicated dense parameter tagged `sequence_parallel` (megatron_ce/ce/layer.py): in training
megatron-core's finalize_model_grads sums its gradient over the tensor-parallel group (each TP rank
holds its own sequence shard and, for ia3, its ffn slice of theta_down) and DDP reduces it over the
data-parallel group (which spans the expert-parallel ranks: EP splits data-parallel ranks). A rank's
gradient only covers the tokens it routed or received, so summing over TP and DP gives the gradient
of the whole batch. Calibration sums the same way and normalises by the global element count, so
the fitted theta does not depend on the layout (docs/METHOD.md, "How it is distributed").
"""

from typing import List

import torch
import torch.distributed as dist


def _parallel_state():
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps


def token_groups() -> List:
    """Groups whose ranks hold different tokens of the MoE layers: TP (sequence shards) and DP."""
    ps = _parallel_state()
    if ps is None:
        return []
    groups = []
    if ps.get_tensor_model_parallel_world_size() > 1:
        groups.append(ps.get_tensor_model_parallel_group())
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        groups.append(ps.get_data_parallel_group(with_context_parallel=True))
    return groups


def sequence_groups() -> List:
    """Groups whose ranks hold different sequences (LM losses are already full on every TP rank)."""
    ps = _parallel_state()
    if ps is None or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return []
    return [ps.get_data_parallel_group(with_context_parallel=True)]


def sum_over(t: torch.Tensor, groups) -> torch.Tensor:
    """In place sum of t over each group in turn (the groups are orthogonal: a sum over their product)."""
    for group in groups:
        dist.all_reduce(t, group=group)
    return t


def check_layout() -> None:
    """Calibration runs each rank's whole model: no pipeline stages."""
    from megatron_ce.calibrate.modes import CalibrationError

    ps = _parallel_state()
    if ps is not None and ps.get_pipeline_model_parallel_world_size() > 1:
        raise CalibrationError("calibration needs --pipeline-model-parallel-size=1 (each rank runs the whole model)")


def check_same_count(n: int, what: str) -> None:
    """Every rank must run the same number of forwards: expert-parallel ranks dispatch together."""
    from megatron_ce.calibrate.modes import CalibrationError

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    t = torch.tensor([n, -n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != n or -int(t[1]) != n:
        raise CalibrationError(f"{what}: ranks hold between {-int(t[1])} and {int(t[0])} batches; every rank needs "
                               "the same number")


