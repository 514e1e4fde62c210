"""Preemption and fault hooks of the training loop.

`ExitSignalHandler` (Megatron's `--exit-signal-handler`): schedulers send SIGTERM some time before they
kill a job (SLURM: `--signal`, then KILL after its grace time; torchrun forwards it to every worker).
The handler only records the signal; at the end of each iteration the ranks agree on it with one
all-reduce, so they all stop after the same iteration, save together and exit 0.

`maybe_inject_fault`: the reliability tests need a rank to die at a known point mid-step. The
environment variable MEGATRON_CE_FAULT="sigkill:rank=R:iter=N" makes global rank R SIGKILL itself in
iteration N after its forward/backward pass and before the optimizer step (when the other ranks wait
in the step's collectives). Unset in normal runs; the loop reads it once.
"""

from __future__ import annotations

import os
import signal
from typing import Optional, Tuple

import torch

FAULT_ENV = "MEGATRON_CE_FAULT"


class ExitSignalHandler:
    def __init__(self, signame: str = "SIGTERM"):
        self.sig = getattr(signal, signame.upper())
        self.name = self.sig.name
        self._received = False
        self._previous = signal.signal(self.sig, self._handle)

    def _handle(self, signum, frame):
        self._received = True

    def agreed(self) -> bool:
        """Collective: did any rank receive the signal?"""
        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(self.sig, self._previous)


def parse_fault(spec: Optional[str]) -> Optional[Tuple[int, int]]:
    """'sigkill:rank=R:iter=N' -> (R, N); None when unset."""
    if not spec:
        return None
    kind, *fields = spec.split(":")
    kv = dict(f.split("=", 1) for f in fields if "=" in f)
    if kind != "sigkill" or set(kv) != {"rank", "iter"}:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected 'sigkill:rank=R:iter=N'")
    return int(kv["rank"]), int(kv["iter"])


_FAULT = parse_fault(os.environ.get(FAULT_ENV))


def maybe_inject_fault(iteration: int) -> None:
    if _FAULT is not None and _FAULT == (torch.distributed.get_rank(), iteration):
        print(f"[rank {_FAULT[0]}] {FAULT_ENV}: SIGKILL in iteration {iteration}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
