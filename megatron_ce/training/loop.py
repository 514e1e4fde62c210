"""The SFT training loop: one readable function, `train(args)`.

Set-up (parallel state, data, model, optimizer, schedule, checkpoint) and then, per iteration:
micro-batches of this data-parallel rank -> megatron-core forward/backward schedule (pipeline aware,
gradient accumulation over micro-batches, grads finalized over DP/TP/PP) -> NaN check -> optimizer
step -> LR step -> log / eval / save.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from functools import partial
from typing import Dict, List

import torch

from megatron_ce.training import checkpoint as ckpt
from megatron_ce.training.args import ArgError, train_iters_from_epochs
from megatron_ce.training.data import (GlobalBatchSampler, batch_to_device, eval_microbatches, model_device,
                                       needs_attention_mask, train_microbatches)
from megatron_ce.training.metrics import MetricsWriter, RoutingStats, log_line, theta_stats
from megatron_ce.training.model import model_provider
from megatron_ce.training.optimizer import build_optimizer, logged_lr
from megatron_ce.training.resilience import ExitSignalHandler, maybe_inject_fault


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss (exit code 3); the last good checkpoint is kept."""


def print0(*a):
    if torch.distributed.get_rank() == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# one step
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------


def wrap_model(gpt, args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = gpt.config
    if torch.cuda.is_available():
        # megatron-core builds some modules on the CPU whatever use_cpu_initialization says (the local
        # spec's torch norms, the router until its first forward): the whole model goes to this rank's
        # GPU, as Megatron-LM's get_model does. The device is the only difference from a CPU run.
        gpt.cuda(torch.cuda.current_device())
    module = Float16Module(config, gpt) if args.bf16 else gpt
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        bucket_size=getattr(args, "ddp_bucket_size", None),
        check_for_nan_in_grad=False)  # the loop checks the loss itself and stops cleanly
    model = DistributedDataParallel(config, ddp_config, module)
    if args.overlap_param_gather:
        gather_before_ce_layers(model)
    config.finalize_model_grads_func = finalize_model_grads  # waits for (or runs) the grad reduction
    config.no_sync_func = model.no_sync
    if args.overlap_grad_reduce:
        # As Megatron-LM (align_grad_reduce): under pipeline parallelism the 1F1B schedule launches the
        # reduction of stages other than the first after their last backward.
        config.grad_sync_func = model.start_grad_sync
    return model


def gather_before_ce_layers(model) -> None:
    """megatron-core's forward pre-hooks wait for a parameter's overlapped all-gather at the module
    that owns it, when that module's forward runs. A CE MoE layer reads some of its parameters without
    running their owner's forward: the theta tables (CompressedExperts.mix) and the experts' fc1
    weights (read directly by the CE GEMMs, megatron_ce/ce/experts.py). So every parameter of a CE
    layer is waited for when the layer's forward starts (its buckets were dispatched by then)."""
    from megatron_ce.ce.layer import CEMoELayer

    def wait_for_params(layer, *unused):
        groups = {id(g): g for g in (model.param_to_bucket_group.get(p) for p in layer.parameters()) if g is not None}
        for g in groups.values():
            g.finish_param_sync()

    for m in model.module.modules():
        if isinstance(m, CEMoELayer):
            m.register_forward_pre_hook(wait_for_params)


@contextlib.contextmanager
def params_gathered(model, args):
    """With --overlap-param-gather the distributed optimizer leaves the all-gather of the updated
    parameters to the next forward's pre-hooks, so between a step and that forward a rank holds only
    its own shard up to date. Reading weights there (checkpoint save, eval) gathers them first,
    synchronously, as Megatron-LM does; the hooks resume afterwards."""
    if not args.overlap_param_gather:
        yield
        return
    model.disable_forward_pre_hook()
    try:
        yield
    finally:
        model.enable_forward_pre_hook()


def resume_source(args):
    """(checkpoint folder, its training state or None): resume from --load (default --save) if it has a
    training checkpoint; weights only (state None) from a converted 'release' checkpoint there, with
    --finetune, or from --pretrained-checkpoint when there is nothing to resume; else (None, None)."""
    path = ckpt.find_checkpoint(args.load or args.save) if (args.load or args.save) else None
    if args.load and path is None:
        raise ArgError(f"--load={args.load} holds no checkpoint ({ckpt.TRACKER} missing)")
    if path is not None:
        return path, None if args.finetune else ckpt.read_train_state(path)
    if args.pretrained_checkpoint:
        path = ckpt.find_checkpoint(args.pretrained_checkpoint) or args.pretrained_checkpoint
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ArgError(f"--pretrained-checkpoint={args.pretrained_checkpoint} is not a megatron-core dist "
                           "checkpoint (no .metadata) nor a folder with latest_checkpointed_iteration.txt")
        return path, None
    return None, None


def restore(state, rank_state, source, optimizer, scheduler, args):
    """Scheduler, optimizer and RNG from a training checkpoint (weights are already loaded).
    Returns (iteration, consumed samples). The optimizer state and RNG need the same layout."""
    scheduler.load_state_dict(state["scheduler"])
    same = state["layout"] == ckpt.parallel_layout(args)
    if not same:
        reason = f"layout {state['layout']} -> {ckpt.parallel_layout(args)}"
    elif args.no_load_optim or rank_state is None or rank_state["optimizer"] is None:
        reason = "no optimizer state saved, or --no-load-optim"
    else:
        reason = ckpt.load_optimizer_rank_state(optimizer, rank_state["optimizer"])
    if reason is not None:
        optimizer.reload_model_params()  # master weights from the loaded model weights
        print0(f"WARNING: optimizer state not restored ({reason}); weights, iteration, data position and "
               "LR schedule restored, the optimizer starts fresh")
    if same and rank_state is not None and not args.no_load_rng:
        ckpt.set_rng_state(rank_state["rng"])
    print0(f"resumed from {source} at iteration {state['iteration']} ({state['consumed_samples']} samples consumed)")
    return state["iteration"], state["consumed_samples"]


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train(args) -> Dict[str, object]:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_ce.data import build_sft_dataset_from_args
    from megatron_ce.runtime import init_parallel

    # Installed first: a SIGTERM during set-up is then acted on after the first iteration.
    exit_handler = ExitSignalHandler(args.exit_signal) if args.exit_signal_handler else None
    init_parallel(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                  ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
                  seed=args.seed, timeout_s=args.distributed_timeout_minutes * 60)
    train_ds, eval_ds, stats, tokenizer = build_sft_dataset_from_args(args)  # same on every rank
    print0(stats.summary())
    if needs_attention_mask(train_ds) and args.transformer_impl == "transformer_engine":
        raise ArgError("--sft-packing boundary needs --transformer-impl local (block-diagonal attention masks); "
                       "with Transformer Engine use --sft-packing reference or none")
    train_iters = args.train_iters or train_iters_from_epochs(args, len(train_ds))

    # Model, weights, optimizer, schedule.
    gpt, meta = model_provider(args, len(tokenizer))
    source, state = resume_source(args)
    rank_state = None
    if source is not None:
        if state is not None:  # checked before the weights: a changed setting is the likelier mistake
            ckpt.check_model_settings(state.get("model"), ckpt.model_settings(gpt.config), source)
        ckpt.load_model_weights(gpt, source)
        print0(f"loaded model weights from {source}")
        if state is not None:
            usable = state["layout"] == ckpt.parallel_layout(args) and not (args.no_load_optim and args.no_load_rng)
            rank_state = ckpt.load_rank_state(source, state, usable)
    model = wrap_model(gpt, args)
    optimizer, scheduler = build_optimizer(model, args, train_iters)
    gpt.config.grad_scale_func = optimizer.scale_loss
    iteration, consumed = restore(state, rank_state, source, optimizer, scheduler, args) if state else (0, 0)

    sampler = GlobalBatchSampler(len(train_ds), args.seed)
    routing = RoutingStats(gpt, gpt.config.num_layers, gpt.config.num_moe_experts)
    writer = MetricsWriter(args.tensorboard_dir, purge_step=iteration + 1 if iteration else None)
    print0(f"training {train_iters} iterations: global batch {args.global_batch_size} = micro "
           f"{args.micro_batch_size} x dp {args.data_parallel_size} x {args.num_microbatches} micro-batches; "
           f"seq {args.seq_length}; TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
           f"EP {args.expert_model_parallel_size}; CE k_a={args.moe_ce_num_compressed} ({args.moe_ce_variant})")
    tokens_per_iter = args.global_batch_size * args.seq_length
    last_saved, history = (iteration if state is not None else None), []
    acc = loss_sums(model_device(model))
    step_time, iters_since_log = 0.0, 0

    def kept():
        if last_saved is None or not args.save:
            return "no checkpoint was saved"
        return f"the last good checkpoint {ckpt.iter_dir(args.save, last_saved)} is kept"

    def save(it):
        nonlocal last_saved
        with params_gathered(model, args):
            path = ckpt.save_checkpoint(args.save, it, gpt, optimizer, scheduler, consumed, args, meta)
        last_saved = it
        print0(f"saved checkpoint {path}")
        if args.keep_last_checkpoints:
            removed = ckpt.prune_checkpoints(args.save, args.keep_last_checkpoints, it, background=True)
            if removed:
                print0(f"removed old checkpoint(s) {', '.join(os.path.basename(p) for p in removed)} "
                       f"(--keep-last-checkpoints={args.keep_last_checkpoints})")

    while iteration < train_iters:
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        step_loss = run_schedule(model, train_microbatches(train_ds, sampler, consumed, args), args, False)
        maybe_inject_fault(iteration + 1)
        loss = mean_loss(step_loss)  # the non-finite check needs it every step
        if not math.isfinite(loss):
            raise TrainingStopped(f"loss is {loss} at iteration {iteration + 1}; stopping ({kept()})")
        _, grad_norm, _ = optimizer.step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingStopped(f"grad norm is {grad_norm} at iteration {iteration + 1}; stopping ({kept()})")
        lr = logged_lr(optimizer)
        scheduler.step(increment=1)
        iteration += 1
        consumed += args.global_batch_size
        acc += step_loss
        iters_since_log += 1
        step_time += time.perf_counter() - t0
        history.append(loss)

        if iteration % args.log_interval == 0 or iteration == train_iters:
            m = dict(loss=loss, loss_avg=mean_loss(acc), lr=lr, grad_norm=float(grad_norm or 0.0),
                     tokens_per_s=iters_since_log * tokens_per_iter / step_time,
                     loss_tokens=step_loss[1].item(), epoch=sampler.epoch(consumed))
            r = routing.reduce_and_reset(gpt.config.moe_router_topk, args.moe_aux_loss_coeff)
            clear_aux_losses_tracker()  # megatron-core's own aux-loss log (we compute ours from the hooks)
            with params_gathered(model, args):  # theta_stats may read the model's own fp32 copy
                th = theta_stats(gpt, optimizer, gpt.config.num_layers)
            if r.get("layer"):
                m["aux_loss"] = sum(r["aux_loss"]) / len(r["aux_loss"])
            writer.training(iteration, m, r, th)
            print0(log_line(iteration, train_iters, m, r, th))
            acc.zero_()
            step_time, iters_since_log = 0.0, 0
        if args.eval_interval and len(eval_ds) and (iteration % args.eval_interval == 0 or iteration == train_iters):
            routing.enabled = False
            with params_gathered(model, args):
                eval_loss = mean_loss(evaluate(model, eval_ds, args))
            routing.enabled = True
            writer.scalar("eval/loss", eval_loss, iteration)
            print0(f"iter {iteration:6d} | eval loss {eval_loss:.4f}")
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
        writer.flush()
        if exit_handler is not None and iteration < train_iters and exit_handler.agreed():
            if args.save and last_saved != iteration:
                save(iteration)
            where = f"saved {ckpt.iter_dir(args.save, iteration)}" if args.save else "no --save: nothing saved"
            print0(f"received {exit_handler.name}: stopped after iteration {iteration}, {where}; "
                   "run the same command again to resume")
            break

    if args.save and last_saved != iteration:
        save(iteration)
    ckpt.wait_for_pruning()
    writer.close()
    if exit_handler is not None:
        exit_handler.restore()
    if torch.distributed.get_rank() == 0:
        if args.save:
            print(f"checkpoint: {os.path.abspath(ckpt.iter_dir(args.save, iteration))}", flush=True)
        if args.tensorboard_dir:
            print(f"tensorboard events: {os.path.abspath(args.tensorboard_dir)}", flush=True)
            print(f"view them with: tensorboard --logdir {os.path.abspath(args.tensorboard_dir)}", flush=True)
    return {"iteration": iteration, "losses": history}
