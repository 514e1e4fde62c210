"""torch.distributed + megatron-core parallel-state set-up that also works without CUDA."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch

from megatron_ce.runtime.cpu_shims import apply_cpu_shims, define_missing_te_names

__all__ = ["init_parallel", "destroy_parallel"]


def _init_process_group(timeout: Optional[datetime.timedelta]) -> None:
    """Initialise the default process group from torchrun env vars (gloo on CPU; with CUDA, NCCL for CUDA
    tensors and gloo for CPU ones: the trainer reduces small CPU tensors such as loss sums and the
    stop/save-failure flags over the world group)."""
    cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"init_parallel: RANK/WORLD_SIZE set but {', '.join(missing)} missing")
        torch.distributed.init_process_group(
            backend=backend,
            init_method="env://",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            **kwargs,
        )
    else:
        # Plain `python script.py`: a single-process world needs no rendezvous.
        torch.distributed.init_process_group(
            backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1, **kwargs
        )


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    seed: int = 1234,
    timeout_s: Optional[float] = None,
) -> None:
    """Initialise torch.distributed (if needed) and megatron-core model-parallel state.

    tp/pp/ep/etp: tensor, pipeline, expert and expert-tensor parallel sizes (etp None: = tp).
    The data-parallel size is world_size // (tp * pp).  Seeds mcore's RNG tracker and torch.
    """
    from megatron.core import parallel_state, tensor_parallel

    timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
    if not torch.distributed.is_initialized():
        _init_process_group(timeout)
    if torch.cuda.is_available():
        define_missing_te_names()  # a GPU without TransformerEngine (local specs)
    else:
        apply_cpu_shims()

    world_size = torch.distributed.get_world_size()
    if tp < 1 or pp < 1 or ep < 1 or (etp is not None and etp < 1):
        raise ValueError(f"parallel sizes must be >= 1 (tp={tp}, pp={pp}, ep={ep}, etp={etp})")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) = {tp * pp}"
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    extra = {}
    if timeout_s is not None:
        # Typed int in mcore, but only ever passed to timedelta(minutes=...): fractions work.
        extra["distributed_timeout_minutes"] = float(timeout_s) / 60
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **extra,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# One home for "which rank am I / wait for everyone": the trainer's checkpoints and the calibration tool
# both run with and without a process group (single-process tools and tests have none).


def _dist_up() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    """This process's global rank; 0 without a process group."""
    return torch.distributed.get_rank() if _dist_up() else 0


def is_rank0() -> bool:
    return global_rank() == 0


def barrier() -> None:
    """torch.distributed.barrier() when a process group exists; nothing otherwise."""
    if _dist_up():
        torch.distributed.barrier()
