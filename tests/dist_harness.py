"""Multi-process test harness for megatron-core on CPU (gloo) and a layout-equivalence workflow.

Two layers:

* :func:`run_distributed` runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned
  processes with torchrun-style env vars set (``fn`` calls ``init_parallel`` itself).  A hang
  fails after ``timeout`` seconds (children are killed); an exception in any rank fails with
  that rank's traceback; rank 0's return value is returned (pickled through a file).

* :func:`check_layout_equivalence` proves that a parallel layout computes the same loss and
  gradients as a single-rank run on the same global weights and global batch:

  (a) world-1 reference (cached per model config for the session): build a tiny GPTModel,
      save its weights with ``dist_checkpointing.save``, run one forward/backward through
      ``get_forward_backward_func()`` with mcore DDP + ``finalize_model_grads``, save the
      gradients (``main_grad`` copied into the params) as a dist checkpoint;
  (b) world-N run at the layout: load the weights with ``dist_checkpointing.load``, split the
      same global batch over the DP ranks (same micro-batches as the reference), same
      schedule, finalize grads, save the gradients the same way -- the dist checkpoint
      reassembles them in global form whatever the TP/PP/EP sharding;
  (c) compare in this process (plain torch.distributed.checkpoint, no megatron import): the
      loss and every gradient, name by name.

``spec_fn`` (``spec_fn(config) -> layer spec``) must be a top-level function (it is pickled by
reference into the spawned processes).  Ranks use CUDA/nccl only when there is a GPU per rank
(:func:`cuda_fits`); otherwise GPUs are hidden from them and they run on CPU with gloo and the
CPU shims, so the same tests run on a laptop, CI and a one-GPU machine.

Also here: :func:`build_tiny_gpt` / :func:`make_tiny_config` (TINY_CONFIG + overrides),
:func:`make_global_batch`, :func:`local_microbatches`, :func:`wrap_ddp`,
:func:`train_step_grads` (usable inside your own rank functions), and
:func:`run_optimizer_steps` (mcore plain vs distributed optimizer from the same init).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tiny GPT defaults (overridable through config_kwargs).
VOCAB_SIZE = 128
SEQ_LENGTH = 32
GLOBAL_BATCH_SIZE = 8
MICRO_BATCH_SIZE = 2
DATA_SEED = 4321

TINY_CONFIG: Dict[str, Any] = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=64,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=64,
    moe_aux_loss_coeff=1e-2,
    moe_router_load_balancing_type="aux_loss",
    moe_token_dispatcher_type="allgather",
    moe_router_dtype="fp32",  # exercises the router GEMM path (needs the TE-name shim)
    moe_grouped_gemm=False,
    moe_permute_fusion=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    add_bias_linear=False,
    init_method_std=0.02,
    use_cpu_initialization=True,
    bf16=False,
    fp16=False,
    gradient_accumulation_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)

# Default tolerance: max|a-b| <= RTOL * max|b| + ATOL, per tensor.
RTOL = 1e-5
ATOL = 1e-7


class DistributedTestError(RuntimeError):
    """A rank raised, died, or the run timed out."""


# ======================================================================================
# run_distributed
# ======================================================================================


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_sys_path() -> None:
    # ``tests.*`` and ``megatron_ce`` importable in the child even without an editable install.
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def _worker(fn, rank: int, world_size: int, args: tuple, out_dir: str, port: int, threads: int):
    # Own process group, so the parent can kill this rank together with anything it started
    # (e.g. the multiprocessing Manager behind dist_checkpointing.save).
    os.setpgrp()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    code = 0
    try:
        _ensure_sys_path()
        import torch

        torch.set_num_threads(threads)
        result = fn(rank, world_size, *args)
        if rank == 0:
            tmp = os.path.join(out_dir, "result.pkl.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(result, f)
            os.replace(tmp, os.path.join(out_dir, "result.pkl"))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        code = 1
        tb = traceback.format_exc()
        try:
            with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
                f.write(tb)
        finally:
            sys.stderr.write(f"[rank {rank}] {tb}")
    finally:
        for child in multiprocessing.active_children():
            child.terminate()
        sys.stdout.flush()
        sys.stderr.flush()
    # Skip interpreter teardown: gloo/process-group destructors can block once a peer died.
    os._exit(code)


def _kill_all(procs) -> None:
    for p in procs:
        if p.pid is None:
            continue
        try:  # the rank's process group: the rank and whatever it started
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(10)


def cuda_fits(world_size: int) -> bool:
    """True when there is one CUDA device per rank (then ranks use nccl; else CPU and gloo)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= world_size


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180, cuda: Optional[bool] = None
) -> Any:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return rank 0's result.

    Each child gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free port) and
    ``torch.set_num_threads(max(1, cpus // world_size))``; ``fn`` must be picklable by reference
    (a top-level function) and does its own ``init_parallel``.  ``cuda``: None = use GPUs only if
    there is one per rank (:func:`cuda_fits`); False hides GPUs from the children
    (CUDA_VISIBLE_DEVICES=""), so they take the CPU/gloo path.  Raises
    :class:`DistributedTestError` with the failing rank's traceback if any rank raises or dies,
    or after ``timeout`` seconds (all children are killed either way).
    """
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    port = _free_port()
    if cuda is None:
        cuda = cuda_fits(world_size)
    with tempfile.TemporaryDirectory(prefix="dist_harness_") as out_dir, _child_env(cuda):
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, args, out_dir, port, threads),
                name=f"rank{rank}",
                daemon=False,  # dist_checkpointing.save starts a multiprocessing Manager
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.exitcode for p in procs]
                if any(c not in (None, 0) for c in codes):
                    # Give the other ranks a moment to write their own errors, then kill.
                    multiprocessing.connection.wait([p.sentinel for p in procs], timeout=1.0)
                    _kill_all(procs)
                    raise DistributedTestError(_failure_report(fn, procs, out_dir))
                if all(c == 0 for c in codes):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    stuck = [r for r, p in enumerate(procs) if p.exitcode is None]
                    _kill_all(procs)
                    raise DistributedTestError(
                        f"{_fn_name(fn)}: timed out after {timeout:.0f}s with world_size="
                        f"{world_size}; ranks still running (killed): {stuck}"
                        + _errors_text(out_dir)
                    )
                live = [p.sentinel for p in procs if p.exitcode is None]
                multiprocessing.connection.wait(live, timeout=min(left, 1.0))
        finally:
            _kill_all(procs)
        result_file = os.path.join(out_dir, "result.pkl")
        if not os.path.exists(result_file):
            raise DistributedTestError(f"{_fn_name(fn)}: rank 0 exited 0 without writing a result")
        with open(result_file, "rb") as f:
            return pickle.load(f)


@contextlib.contextmanager
def _child_env(cuda: bool):
    """Environment the spawned children inherit at start(): GPUs hidden unless ``cuda``."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _fn_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _errors_text(out_dir: str) -> str:
    files = sorted(Path(out_dir).glob("error_*.txt"), key=lambda p: p.stat().st_mtime)
    return "".join(f"\n\n===== {f.stem.replace('_', ' ')} =====\n{f.read_text()}" for f in files)


def _failure_report(fn, procs, out_dir: str) -> str:
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    files = sorted(Path(out_dir).glob("error_*.txt"), key=lambda p: p.stat().st_mtime)
    first = files[0].stem.split("_")[1] if files else None
    head = f"{_fn_name(fn)} failed; exit codes {codes}"
    if first is not None:
        head += f"; first failure on rank {first} (traceback first)"
    else:
        head += " (no Python traceback: a rank was killed or crashed)"
    return head + _errors_text(out_dir)


# ======================================================================================
# Tiny GPT (runs inside the spawned processes)
# ======================================================================================


def _device():
    """Where tensors live: the current CUDA device when there is one (nccl), else CPU (gloo)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_spec_fn(config):
    """mcore's local (no-TE) GPT layer spec for ``config``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ce import compat

    return get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
        **compat.legacy_grouped_gemm_kwargs(compat.uses_legacy_grouped_gemm(config)),
    )


def make_tiny_config(config_kwargs: Optional[dict] = None):
    """TransformerConfig: TINY_CONFIG + config_kwargs, fp32, CPU init, current parallel sizes.

    Parallel sizes come from the initialised ``parallel_state``; sequence parallelism defaults
    to on whenever TP > 1 (mcore MoE requires it).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ce.ce import CETransformerConfig

    kw = dict(TINY_CONFIG)
    kw.update(config_kwargs or {})
    tp = ps.get_tensor_model_parallel_world_size()
    kw.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    kw.setdefault("sequence_parallel", tp > 1)
    # CE fields (moe_ce_*) need the CE config; plain runs keep megatron-core's own class.
    cls = CETransformerConfig if any(k.startswith("moe_ce_") for k in kw) else TransformerConfig
    return cls(**kw)


def build_tiny_gpt(
    config_kwargs: Optional[dict] = None,
    spec_fn: Optional[Callable] = None,
    *,
    vocab_size: int = VOCAB_SIZE,
    seq_length: int = SEQ_LENGTH,
):
    """A tiny GPTModel (this rank's pipeline stage) on the initialised parallel state.

    ``spec_fn(config)`` returns the transformer-layer spec (default: :func:`default_spec_fn`).
    Returns ``(model, config)``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = make_tiny_config(config_kwargs)
    spec = (spec_fn or default_spec_fn)(config)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    return model.to(_device()), config


def make_global_batch(
    global_batch_size: int = GLOBAL_BATCH_SIZE,
    seq_length: int = SEQ_LENGTH,
    vocab_size: int = VOCAB_SIZE,
    seed: int = DATA_SEED,
) -> Dict[str, Any]:
    """Deterministic token batch: tokens, labels (next token), loss_mask, position_ids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab_size, (global_batch_size, seq_length + 1), generator=g)
    return {
        "tokens": data[:, :-1].contiguous(),
        "labels": data[:, 1:].contiguous(),
        "loss_mask": torch.ones(global_batch_size, seq_length),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(global_batch_size, -1).contiguous(),
    }


def local_microbatches(batch: Dict[str, Any], micro_batch_size: int) -> List[Dict[str, Any]]:
    """This DP rank's contiguous share of the global batch, cut into micro-batches in order."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = batch["tokens"].shape[0]
    if n % (dp * micro_batch_size) != 0:
        raise ValueError(
            f"global batch {n} not divisible by data-parallel size {dp} x micro batch {micro_batch_size}"
        )
    per_rank = n // dp
    start = dp_rank * per_rank
    return [
        {k: v[i : i + micro_batch_size] for k, v in batch.items()}
        for i in range(start, start + per_rank, micro_batch_size)
    ]


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = (losses * mask).sum() / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    import functools

    mb = {k: v.to(_device()) for k, v in next(data_iterator).items()}
    output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
    return output, functools.partial(_loss_func, mb["loss_mask"])


def wrap_ddp(model, config, ddp_kwargs: Optional[dict] = None):
    """mcore DDP (grads all-reduced in fp32, no overlap) with the schedule hooks set on config."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    kw = dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
    kw.update(ddp_kwargs or {})
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(**kw), model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def train_step_grads(ddp, microbatches, seq_length: int = SEQ_LENGTH) -> float:
    """One forward/backward (no optimizer step) through mcore's schedule; grads finalized.

    Returns the global mean loss (identical on every rank).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(microbatches),
        model=[ddp],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=False,
    )
    contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    local = sum(float(d["lm loss"]) for d in losses) / len(losses) if contributes else 0.0
    t = torch.tensor([local], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t)
    return float(t.item()) / ps.get_data_parallel_world_size()


def grads_into_params(ddp) -> None:
    """Overwrite each param with its (finalized) main_grad so sharded_state_dict exports grads."""
    import torch

    with torch.no_grad():
        for p in ddp.module.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.copy_(g)


def tp_replica_rel_err(module) -> float:
    """Worst disagreement across the TP group, relative to the tensor's max magnitude, of the
    params that TP ranks replicate (norms, router, ...).  After finalize_model_grads their grads
    must agree; the dist checkpoint saves only one replica, so this catches what it would hide."""
    import torch
    from megatron.core import parallel_state as ps

    worst = torch.zeros(1, dtype=torch.float64, device=_device())
    if ps.get_tensor_model_parallel_world_size() > 1:
        group = ps.get_tensor_model_parallel_group()
        for p in module.parameters():
            if getattr(p, "tensor_model_parallel", False) or not getattr(p, "allreduce", True):
                continue  # TP-sharded, or an expert param (not replicated over the TP group)
            hi, lo = p.detach().double().clone(), p.detach().double().clone()
            torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
            scale = max(hi.abs().max().item(), lo.abs().max().item()) if hi.numel() else 0.0
            diff = (hi - lo).abs().max().item() if hi.numel() else 0.0
            err = diff / scale if scale > 0 else diff
            worst = torch.maximum(worst, torch.tensor([err], dtype=torch.float64, device=worst.device))
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return float(worst.item())


# ----------------------------------------------------------------- rank functions


def _sync_checkpoint_saves_in_process() -> None:
    """Test speed-up: dist_checkpointing's writer hands results back through a queue that it
    creates as a spawn-context multiprocessing Manager (~2-3 s to start, per process) so that
    *async* saves can run elsewhere.  The harness only saves synchronously (same process), where
    a thread queue does the same job."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None:
        filesystem_async._results_queue = queue.Queue()


def _reference_rank_fn(rank, world_size, out_dir, config_kwargs, spec_fn, batch_args, micro_batch_size):
    """World-1: build, save weights, one step, save grads.  Returns the loss."""
    from megatron.core import dist_checkpointing

    from megatron_ce.runtime import destroy_parallel, init_parallel

    init_parallel(timeout_s=120)
    _sync_checkpoint_saves_in_process()
    try:
        model, config = build_tiny_gpt(config_kwargs, spec_fn)
        os.makedirs(os.path.join(out_dir, "weights"))
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(out_dir, "weights"))
        ddp = wrap_ddp(model, config)
        batch = make_global_batch(**batch_args)
        loss = train_step_grads(ddp, local_microbatches(batch, micro_batch_size), batch_args["seq_length"])
        grads_into_params(ddp)
        os.makedirs(os.path.join(out_dir, "grads"))
        dist_checkpointing.save(ddp.module.sharded_state_dict(), os.path.join(out_dir, "grads"))
        return {"loss": loss}
    finally:
        destroy_parallel()


def _layout_rank_fn(rank, world_size, out_dir, weights_dir, layout, config_kwargs, spec_fn, batch_args, micro_batch_size):
    """World-N: load reference weights at ``layout``, one step, save grads."""
    t = [time.perf_counter()]
    from megatron.core import dist_checkpointing

    from megatron_ce.runtime import destroy_parallel, init_parallel

    init_parallel(
        tp=layout["tp"], pp=layout["pp"], ep=layout["ep"], etp=layout["etp"], timeout_s=120
    )
    _sync_checkpoint_saves_in_process()
    t.append(time.perf_counter())
    try:
        model, config = build_tiny_gpt(config_kwargs, spec_fn)
        t.append(time.perf_counter())
        state = dist_checkpointing.load(model.sharded_state_dict(), weights_dir)
        model.load_state_dict(state)
        t.append(time.perf_counter())
        ddp = wrap_ddp(model, config)
        batch = make_global_batch(**batch_args)
        loss = train_step_grads(ddp, local_microbatches(batch, micro_batch_size), batch_args["seq_length"])
        t.append(time.perf_counter())
        grads_into_params(ddp)
        replica_err = tp_replica_rel_err(ddp.module)
        dist_checkpointing.save(ddp.module.sharded_state_dict(), out_dir)
        t.append(time.perf_counter())
        phases = ("import+init", "build", "load", "step", "save")
        timings = {k: round(b - a, 3) for k, a, b in zip(phases, t, t[1:])}
        return {"loss": loss, "tp_replica_rel_err": replica_err, "timings": timings}
    finally:
        destroy_parallel()


def _optimizer_rank_fn(rank, world_size, layout, config_kwargs, spec_fn, steps, optimizer_kwargs):
    """Train ``steps`` steps with mcore's plain and distributed optimizer from the same init."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    from megatron_ce.runtime import destroy_parallel, init_parallel

    seed = 1234
    init_parallel(tp=layout["tp"], pp=layout["pp"], ep=layout["ep"], etp=layout["etp"], seed=seed, timeout_s=120)
    try:
        batch = make_global_batch()
        out = {}
        for dist_opt in (False, True):
            torch.manual_seed(seed)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            model, config = build_tiny_gpt(config_kwargs, spec_fn)
            ddp = wrap_ddp(model, config, {"use_distributed_optimizer": dist_opt})
            okw = dict(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=0.5, bf16=False, fp16=False)
            okw.update(optimizer_kwargs or {})
            opt = get_megatron_optimizer(OptimizerConfig(use_distributed_optimizer=dist_opt, **okw), [ddp])
            losses, norms, aux = [], [], []
            for it in range(steps):
                opt.zero_grad()
                mbs = local_microbatches(batch, MICRO_BATCH_SIZE)
                losses.append(train_step_grads(ddp, mbs))
                ok, grad_norm, _ = opt.step()
                if not ok:
                    raise RuntimeError("optimizer step was skipped")
                norms.append(float(grad_norm))
                # MoE load-balancing-loss logging as a training loop does it.
                logged = {}
                track_moe_metrics(
                    loss_scale=1.0 / len(mbs), iteration=it, total_loss_dict=logged,
                    force_initialize=True, track_names=["load_balancing_loss"],
                    num_layers=config.num_layers, moe_layer_freq=1,
                )
                aux.append(float(logged["load_balancing_loss"]))
            out["distributed" if dist_opt else "plain"] = {
                "losses": losses, "grad_norms": norms, "load_balancing_loss": aux,
            }
        return out
    finally:
        destroy_parallel()


def run_optimizer_steps(
    layout: dict,
    config_kwargs: Optional[dict] = None,
    spec_fn: Optional[Callable] = None,
    *,
    steps: int = 3,
    optimizer_kwargs: Optional[dict] = None,
    timeout: float = 180,
) -> Dict[str, Dict[str, List[float]]]:
    """``steps`` training steps at ``layout`` with mcore's plain and distributed optimizer (Adam,
    grad clipping) from identical init, in one spawn.  Returns
    ``{"plain": {"losses": [...], "grad_norms": [...]}, "distributed": {...}}``."""
    layout = normalize_layout(layout)
    run_kwargs = dict(config_kwargs or {})
    run_kwargs["moe_token_dispatcher_type"] = layout["dispatcher"]
    run_kwargs.update(layout.get("config") or {})
    return run_distributed(
        _optimizer_rank_fn, layout["world_size"], layout, run_kwargs, spec_fn, steps,
        optimizer_kwargs, timeout=timeout,
    )


# ======================================================================================
# Comparison (runs in the calling process; plain torch, no megatron import)
# ======================================================================================


def load_dist_checkpoint_tensors(ckpt_dir) -> Dict[str, Any]:
    """All tensors of a megatron-core torch_dist checkpoint, reassembled in global form, keyed
    by sharded-state-dict key (layers stacked: ``decoder.layers.<name>`` has a layer axis)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "full.pt")
        dcp_to_torch_save(str(ckpt_dir), out)
        sd = torch.load(out, map_location="cpu", weights_only=False)
    return {k: v for k, v in _flatten(sd).items() if isinstance(v, torch.Tensor)}


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def split_stacked(tensors: Dict[str, Any], num_experts: Optional[int] = None) -> Dict[str, Any]:
    """Per-layer (and per-expert) entries from stacked checkpoint tensors, so each layer's and
    each expert's gradient is compared against its own scale:
    ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` [L, E, ...] ->
    ``decoder.layers.3.mlp.experts.experts.linear_fc1.weight[expert 5]``."""
    out = {}
    for name, t in tensors.items():
        if not name.startswith("decoder.layers.") or t.dim() == 0:
            out[name] = t
            continue
        rest = name[len("decoder.layers."):]
        for i in range(t.shape[0]):
            layer_name, lt = f"decoder.layers.{i}.{rest}", t[i]
            if num_experts and ".experts." in f".{rest}" and lt.dim() >= 1 and lt.shape[0] == num_experts:
                for e in range(num_experts):
                    out[f"{layer_name}[expert {e}]"] = lt[e]
            else:
                out[layer_name] = lt
    return out


@dataclasses.dataclass
class EquivalenceResult:
    """Outcome of :func:`check_layout_equivalence` (errors are max|a-b| / max|ref| per tensor)."""

    layout: dict
    loss: float
    ref_loss: float
    max_rel_grad_err: float
    worst_grad: str
    num_grads: int
    tp_replica_rel_err: float  # see tp_replica_rel_err()
    grad_errors: Dict[str, float]
    failures: List[str]  # tensors outside max|a-b| <= rtol*max|b| + atol
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)  # rank 0, seconds

    @property
    def loss_rel_err(self) -> float:
        return abs(self.loss - self.ref_loss) / max(abs(self.ref_loss), 1e-30)

    def assert_equivalent(self, rtol: float = RTOL, atol: float = ATOL) -> None:
        problems = []
        if abs(self.loss - self.ref_loss) > rtol * abs(self.ref_loss) + atol:
            problems.append(f"loss {self.loss!r} vs reference {self.ref_loss!r}")
        if self.failures:
            problems.append(f"{len(self.failures)} gradients differ: " + "; ".join(self.failures[:8]))
        if self.tp_replica_rel_err > rtol:
            problems.append(f"TP-replicated grads disagree across TP ranks (rel {self.tp_replica_rel_err:.3g})")
        if problems:
            raise AssertionError(f"layout {self.layout} != world-1 reference: " + " | ".join(problems))


def compare_grads(got: Dict[str, Any], ref: Dict[str, Any], rtol: float = RTOL, atol: float = ATOL):
    """Name-by-name comparison.  Returns (errors by name, failure lines, worst name, worst err)."""
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    failures = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in extra]
    errors: Dict[str, float] = {}
    worst, worst_name = 0.0, ""
    for name in sorted(set(ref) & set(got)):
        a, b = got[name].double(), ref[name].double()
        if a.shape != b.shape:
            failures.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        err = diff / scale if scale > 0 else diff
        errors[name] = err
        if err > worst or not worst_name:
            worst, worst_name = err, name
        if diff > rtol * scale + atol:
            failures.append(f"{name}: max|diff|={diff:.3g} max|ref|={scale:.3g}")
    return errors, failures, worst_name, worst


# ----------------------------------------------------------------- reference cache

_REF_CACHE: Dict[str, Tuple[Path, float]] = {}
_REF_ROOT: Optional[Path] = None


def _ref_root() -> Path:
    global _REF_ROOT
    if _REF_ROOT is None:
        _REF_ROOT = Path(tempfile.mkdtemp(prefix="megatron_ce_ref_"))
        atexit.register(shutil.rmtree, str(_REF_ROOT), True)
    return _REF_ROOT


def _ref_key(config_kwargs, spec_fn, batch_args, micro_batch_size, cuda) -> str:
    spec_name = _fn_name(spec_fn) if spec_fn is not None else "default"
    blob = json.dumps(
        [sorted((config_kwargs or {}).items()), spec_name, sorted(batch_args.items()), micro_batch_size, cuda],
        default=repr,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def reference_run(
    config_kwargs: Optional[dict] = None,
    spec_fn: Optional[Callable] = None,
    *,
    global_batch_size: int = GLOBAL_BATCH_SIZE,
    micro_batch_size: int = MICRO_BATCH_SIZE,
    timeout: float = 180,
    cuda: bool = False,
) -> Tuple[Path, float]:
    """World-1 reference for (config, spec, batch): (directory with weights/ and grads/, loss).

    Cached for the session (one spawn per distinct configuration).  ``cuda``: run it on a GPU.
    """
    batch_args = dict(global_batch_size=global_batch_size, seq_length=SEQ_LENGTH, vocab_size=VOCAB_SIZE, seed=DATA_SEED)
    key = _ref_key(config_kwargs, spec_fn, batch_args, micro_batch_size, cuda)
    if key not in _REF_CACHE:
        out = _ref_root() / key
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        res = run_distributed(
            _reference_rank_fn, 1, str(out), dict(config_kwargs or {}), spec_fn, batch_args,
            micro_batch_size, timeout=timeout, cuda=cuda,
        )
        _REF_CACHE[key] = (out, res["loss"])
    return _REF_CACHE[key]


def normalize_layout(layout: dict) -> dict:
    """Fill defaults: tp=pp=ep=1, etp=None (= tp), dispatcher 'allgather', world_size = tp*pp*dp
    with dp the smallest size that fits the expert layout (or layout['dp'])."""
    known = {"tp", "pp", "ep", "etp", "dp", "world_size", "dispatcher", "sequence_parallel", "config"}
    unknown = set(layout) - known
    if unknown:
        raise ValueError(f"unknown layout keys {sorted(unknown)} (known: {sorted(known)})")
    out = dict(tp=1, pp=1, ep=1, etp=None, dispatcher="allgather")
    out.update(layout)
    tp, pp, ep = out["tp"], out["pp"], out["ep"]
    etp = out["etp"] if out["etp"] is not None else tp
    if "world_size" not in out:
        dp = out.get("dp")
        if dp is None:
            dp = 1
            while (tp * dp) % (ep * etp) != 0:
                dp += 1
        out["world_size"] = tp * pp * dp
    out.pop("dp", None)
    return out


def check_layout_equivalence(
    tmp_path,
    layout: dict,
    config_kwargs: Optional[dict] = None,
    spec_fn: Optional[Callable] = None,
    *,
    global_batch_size: int = GLOBAL_BATCH_SIZE,
    micro_batch_size: int = MICRO_BATCH_SIZE,
    timeout: float = 180,
) -> EquivalenceResult:
    """Run the tiny GPT at ``layout`` and compare loss and all grads with the world-1 reference.

    layout keys: tp, pp, ep, etp (None = tp), dispatcher ('allgather' | 'alltoall'),
    sequence_parallel (default tp > 1), world_size or dp, config (extra TransformerConfig
    kwargs for the layout run only).  ``config_kwargs`` apply to both runs (model definition).
    Returns an :class:`EquivalenceResult`; call ``.assert_equivalent()`` to assert.
    """
    layout = normalize_layout(layout)
    # Reference and layout run on the same kind of device: GPUs only if every rank gets one.
    cuda = cuda_fits(layout["world_size"])
    ref_dir, ref_loss = reference_run(
        config_kwargs, spec_fn, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, timeout=timeout, cuda=cuda,
    )
    run_kwargs = dict(config_kwargs or {})
    run_kwargs["moe_token_dispatcher_type"] = layout["dispatcher"]
    if "sequence_parallel" in layout:
        run_kwargs["sequence_parallel"] = layout["sequence_parallel"]
    run_kwargs.update(layout.get("config") or {})
    tag = "_".join(f"{k}{layout[k]}" for k in ("tp", "pp", "ep", "etp", "world_size")) + "_" + layout["dispatcher"]
    grads_dir = Path(tmp_path) / f"grads_{tag}"
    if grads_dir.exists():
        shutil.rmtree(grads_dir)
    grads_dir.mkdir(parents=True)
    batch_args = dict(global_batch_size=global_batch_size, seq_length=SEQ_LENGTH, vocab_size=VOCAB_SIZE, seed=DATA_SEED)
    res = run_distributed(
        _layout_rank_fn, layout["world_size"], str(grads_dir), str(ref_dir / "weights"), layout,
        run_kwargs, spec_fn, batch_args, micro_batch_size, timeout=timeout, cuda=cuda,
    )
    num_experts = {**TINY_CONFIG, **(config_kwargs or {})}.get("num_moe_experts")
    got = split_stacked(load_dist_checkpoint_tensors(grads_dir), num_experts)
    ref = split_stacked(load_dist_checkpoint_tensors(ref_dir / "grads"), num_experts)
    errors, failures, worst_name, worst = compare_grads(got, ref)
    return EquivalenceResult(
        layout=layout,
        loss=res["loss"],
        ref_loss=ref_loss,
        max_rel_grad_err=worst,
        worst_grad=worst_name,
        num_grads=len(errors),
        tp_replica_rel_err=res["tp_replica_rel_err"],
        timings=res.get("timings", {}),
        grad_errors=errors,
        failures=failures,
    )
