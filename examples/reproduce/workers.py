"""Pretraining seeds as parallel worker processes, one torch thread each (--workers).

A seed's computation is self-contained (its own torch / megatron-core / data generators, reset at the
start of experiment.run_seed), so its numbers do not depend on which process runs it or what ran
before: a parallel run equals a serial one (tests/examples/test_reproduce_workers.py). Workers are
spawned, not forked: a fork of a process that already ran torch ops can deadlock in OpenMP.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, Iterator, List, Tuple

import torch

from .experiment import run_seed
from .tasks import make_splits
from .variants import Variant

States = Dict[str, Dict[str, torch.Tensor]]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    from megatron_ce.runtime import init_parallel

    init_parallel(seed=1234)


def seed_job(a, seed: int, vs: List[Variant], threads: int, keep_states: bool) -> Tuple[Dict, States]:
    """One pretraining seed; with keep_states, the SFT'd weights of every variant (for latency, measured
    later in the parent when no worker runs)."""
    splits = make_splits(a.n_test, a.n_val, a.digits)  # rebuilt here: its sampler is a closure
    out, models = run_seed(a, seed, splits, vs, threads, keep_models=keep_states)
    states = {n: {k: v for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
              for n, m in models.items()}
    return out, states


def run_seeds(a, seeds: List[int], vs: List[Variant], keep_states_of: int = 0) -> Iterator[Tuple[Dict, States]]:
    """(seed result, states) in completion order; a.workers == 1 runs them here, one after another."""
    if a.workers == 1 or len(seeds) == 1:
        for s in seeds:
            yield seed_job(a, s, vs, a.threads, s == keep_states_of)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(a.workers, len(seeds)), mp_context=ctx, initializer=_init_worker,
                             initargs=(a.threads,)) as pool:
        jobs = [pool.submit(seed_job, a, s, vs, a.threads, s == keep_states_of) for s in seeds]
        for job in as_completed(jobs):
            yield job.result()
