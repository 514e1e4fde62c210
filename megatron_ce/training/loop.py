"""The SFT training loop, top to bottom.

`setup(args)` builds a `TrainState` (parallel state, data, model, optimizer, schedule, checkpoint
manager, restored position); then, per iteration, `train_step` (this rank's micro-batches through
megatron-core's schedule, NaN check, optimizer and LR step), `maybe_log`, `maybe_eval`, `maybe_save`
and the --exit-signal-handler stop; `finish` saves the last iteration and closes the writers.
`train(args)` runs all of it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from megatron_ce.training import checkpoint as ckpt
from megatron_ce.training.args import ArgError, train_iters_from_epochs
from megatron_ce.training.checkpoint_manager import CheckpointManager
from megatron_ce.training.data import GlobalBatchSampler, model_device, needs_attention_mask, train_microbatches
# wrap_model, params_gathered and the step functions keep their historical home here as well.
from megatron_ce.training.ddp import gather_before_ce_layers, params_gathered, wrap_model
from megatron_ce.training.metrics import MetricsWriter, RoutingStats, log_line, print0, theta_stats
from megatron_ce.training.model import ModelSettings, build_model
from megatron_ce.training.optimizer import build_optimizer, logged_lr
from megatron_ce.training.resilience import maybe_inject_fault
from megatron_ce.training.step import evaluate, forward_step, loss_func, loss_sums, mean_loss, run_schedule

__all__ = ["StepResult", "TrainState", "TrainingStopped", "evaluate", "finish", "forward_step",
           "gather_before_ce_layers", "loss_func", "loss_sums", "maybe_eval", "maybe_log", "maybe_save",
           "mean_loss", "params_gathered", "print0", "run_schedule", "setup", "train", "train_step", "wrap_model"]


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss (exit code 3); the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Everything the loop reads and advances; built by `setup`."""

    args: Any
    gpt: torch.nn.Module  # this rank's GPTModel (its pipeline stage)
    model: torch.nn.Module  # gpt wrapped for training (DistributedDataParallel, Float16Module with --bf16)
    optimizer: Any
    scheduler: Any
    settings: ModelSettings
    train_ds: Any
    eval_ds: Any
    sampler: GlobalBatchSampler  # global sample -> train row, from (seed, consumed samples) only
    routing: RoutingStats
    writer: MetricsWriter
    checkpoints: CheckpointManager
    train_iters: int
    iteration: int = 0
    consumed: int = 0  # samples of the train stream used so far (the data position a resume needs)
    history: List[float] = field(default_factory=list)  # every iteration's loss (the return value)
    acc: Optional[torch.Tensor] = None  # [loss sum, tokens] since the last log line
    step_time: float = 0.0
    iters_since_log: int = 0


@dataclass
class StepResult:
    loss: float
    sums: torch.Tensor  # [loss sum, tokens] of the step, on the model's device
    grad_norm: Optional[float]
    lr: float


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------


def setup(args) -> TrainState:
    from megatron_ce.runtime import init_parallel

    checkpoints = CheckpointManager(args)  # first: it installs the --exit-signal-handler
    init_parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                  ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                  seed=args.seed, timeout_s=args.distributed_timeout_minutes * 60)
    train_ds, eval_ds, tokenizer = _setup_data(args)
    train_iters = args.train_iters or train_iters_from_epochs(args, len(train_ds))
    gpt, settings = build_model(args, len(tokenizer))
    resume = checkpoints.load(gpt)
    model = wrap_model(gpt, args)
    optimizer, scheduler = build_optimizer(model, args, train_iters)
    gpt.config.grad_scale_func = optimizer.scale_loss
    iteration, consumed = checkpoints.restore(resume, optimizer, scheduler)
    state = TrainState(
        args=args, gpt=gpt, model=model, optimizer=optimizer, scheduler=scheduler, settings=settings,
        train_ds=train_ds, eval_ds=eval_ds, sampler=GlobalBatchSampler(len(train_ds), args.seed),
        routing=RoutingStats(gpt, gpt.config.num_layers, gpt.config.num_moe_experts),
        writer=MetricsWriter(args.tensorboard_dir, purge_step=iteration + 1 if iteration else None),
        checkpoints=checkpoints, train_iters=train_iters, iteration=iteration, consumed=consumed,
        acc=loss_sums(model_device(model)))
    print0(_plan(state))
    return state


def _setup_data(args):
    """(train split, eval split or None, tokenizer): the same on every rank."""
    from megatron_ce.data import build_sft_dataset_from_args

    train_ds, eval_ds, stats, tokenizer = build_sft_dataset_from_args(args)
    print0(stats.summary())
    if needs_attention_mask(train_ds) and args.transformer_impl == "transformer_engine":
        raise ArgError("--sft-packing boundary needs --transformer-impl local (block-diagonal attention masks); "
                       "with Transformer Engine use --sft-packing reference or none")
    return train_ds, eval_ds, tokenizer


def _plan(state: TrainState) -> str:
    args, s = state.args, state.settings
    return (f"training {state.train_iters} iterations: global batch {args.global_batch_size} = micro "
            f"{args.micro_batch_size} x dp {args.data_parallel_size} x {args.num_microbatches} micro-batches; "
            f"seq {args.seq_length}; TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
            f"EP {args.expert_model_parallel_size}; CE k_a={s.moe_ce_num_compressed} ({s.moe_ce_variant})")


# ----------------------------------------------------------------------------------------------
# one iteration
# ----------------------------------------------------------------------------------------------


def train_step(state: TrainState) -> StepResult:
    """One global batch: forward/backward, the non-finite checks, optimizer and LR step."""
    args, it = state.args, state.iteration + 1
    t0 = time.perf_counter()
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    sums = run_schedule(state.model, train_microbatches(state.train_ds, state.sampler, state.consumed, args),
                        args, False)
    maybe_inject_fault(it)
    loss = mean_loss(sums)  # the non-finite check needs it every step
    if not math.isfinite(loss):
        raise TrainingStopped(f"loss is {loss} at iteration {it}; stopping ({state.checkpoints.kept()})")
    _, grad_norm, _ = state.optimizer.step()
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise TrainingStopped(f"grad norm is {grad_norm} at iteration {it}; stopping ({state.checkpoints.kept()})")
    lr = logged_lr(state.optimizer)
    state.scheduler.step(increment=1)
    state.iteration = it
    state.consumed += args.global_batch_size
    state.acc += sums
    state.iters_since_log += 1
    state.step_time += time.perf_counter() - t0
    state.history.append(loss)
    return StepResult(loss, sums, grad_norm, lr)


def _due(state: TrainState, interval: Optional[int]) -> bool:
    """Every `interval` iterations, and at the last one."""
    return bool(interval) and (state.iteration % interval == 0 or state.iteration == state.train_iters)


def maybe_log(state: TrainState, step: StepResult) -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    if not _due(state, state.args.log_interval):
        return
    args, gpt = state.args, state.gpt
    m = dict(loss=step.loss, loss_avg=mean_loss(state.acc), lr=step.lr, grad_norm=float(step.grad_norm or 0.0),
             tokens_per_s=state.iters_since_log * args.global_batch_size * args.seq_length / state.step_time,
             loss_tokens=step.sums[1].item(), epoch=state.sampler.epoch(state.consumed))
    r = state.routing.reduce_and_reset(gpt.config.moe_router_topk, args.moe_aux_loss_coeff)
    clear_aux_losses_tracker()  # megatron-core's own aux-loss log (we compute ours from the hooks)
    with params_gathered(state.model, args):  # theta_stats may read the model's own fp32 copy
        th = theta_stats(gpt, state.optimizer, gpt.config.num_layers)
    if r.get("layer"):
        m["aux_loss"] = sum(r["aux_loss"]) / len(r["aux_loss"])
    state.writer.training(state.iteration, m, r, th)
    print0(log_line(state.iteration, state.train_iters, m, r, th))
    state.acc.zero_()
    state.step_time, state.iters_since_log = 0.0, 0


def maybe_eval(state: TrainState) -> None:
    # No eval split (--eval-split-fraction 0 gives none): nothing to evaluate.
    if state.eval_ds is None or not len(state.eval_ds) or not _due(state, state.args.eval_interval):
        return
    state.routing.enabled = False  # eval batches do not count in the routing statistics
    with params_gathered(state.model, state.args):
        eval_loss = mean_loss(evaluate(state.model, state.eval_ds, state.args))
    state.routing.enabled = True
    state.writer.scalar("eval/loss", eval_loss, state.iteration)
    print0(f"iter {state.iteration:6d} | eval loss {eval_loss:.4f}")


def maybe_save(state: TrainState, final: bool = False) -> None:
    """Save if the checkpoint manager's policy says so (`final`: the run is ending)."""
    if state.checkpoints.should_save(state.iteration, final):
        state.checkpoints.save(state.iteration, state.gpt, state.optimizer, state.scheduler, state.consumed,
                               state.settings.record, gathered=lambda: params_gathered(state.model, state.args))


def stop_on_signal(state: TrainState) -> bool:
    """Collective: on an agreed --exit-signal, save this iteration and report; True: stop now."""
    checkpoints, args = state.checkpoints, state.args
    if not checkpoints.stop_requested(state.iteration, state.train_iters):
        return False
    maybe_save(state, final=True)
    where = f"saved {ckpt.iter_dir(args.save, state.iteration)}" if args.save else "no --save: nothing saved"
    print0(f"received {checkpoints.exit_handler.name}: stopped after iteration {state.iteration}, {where}; "
           "run the same command again to resume")
    return True


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def finish(state: TrainState) -> None:
    args = state.args
    maybe_save(state, final=True)
    state.checkpoints.close()
    state.writer.close()
    if torch.distributed.get_rank() == 0:
        if args.save:
            print(f"checkpoint: {os.path.abspath(ckpt.iter_dir(args.save, state.iteration))}", flush=True)
        if args.tensorboard_dir:
            print(f"tensorboard events: {os.path.abspath(args.tensorboard_dir)}", flush=True)
            print(f"view them with: tensorboard --logdir {os.path.abspath(args.tensorboard_dir)}", flush=True)


def train(args) -> Dict[str, object]:
    """Train as the flags say; returns {"iteration": the last one, "losses": every iteration's loss}."""
    state = setup(args)
    while state.iteration < state.train_iters:
        step = train_step(state)
        maybe_log(state, step)
        maybe_eval(state)
        maybe_save(state)
        state.writer.flush()
        if stop_on_signal(state):
            break
    finish(state)
    return {"iteration": state.iteration, "losses": state.history}
