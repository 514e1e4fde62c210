"""Atomic training checkpoints: model weights as a megatron-core dist checkpoint (reshardable), the
rest per rank. The folder format (file names, tracker, megatron_ce.json record, train_state.json)
is defined in megatron_ce/checkpoint_format.py; this module owns the trainer's save protocol and
loads. When to save, what to keep and where to resume: training/checkpoint_manager.py.

Layout of `--save DIR`:

    DIR/latest_checkpointed_iteration.txt     "40" (written last, atomically)
    DIR/iter_0000040/                         model weights (torch_dist: .metadata, *.distcp, common.pt)
        train_state.json                      iteration, consumed samples, LR scheduler, parallel layout
        rank_00000.pt ...                     per rank: optimizer state (+ fp32 master weights), RNG
        optimizer/                            the optimizer state again, reshardable (plain optimizer only)
        megatron_ce.json                      model family / HF config (when built from one)
        tokenizer/                            the tokenizer trained with (--tokenizer-model); HF exports carry it
    DIR/iter_0000044.tmp/                     a save in progress (or interrupted: ignored with a warning)

Save: every rank writes into `iter_N.tmp` (megatron-core's writer fsyncs its files; ours are written to
`.part`, fsynced, renamed); after a barrier rank 0 writes train_state.json, fsyncs the folder, renames
it to `iter_N`, fsyncs DIR, then replaces the tracker file atomically. A crash at any point leaves the
previous tracker and its folder intact.

Optimizer state: megatron-core's default optimizer checkpoint cannot be saved with torch Adam
(docs/METHOD.md §5), so each rank saves its own inner torch optimizer state and master weights with
torch.save: exact (bitwise resumes), restored under the same layout (TP/PP/EP/ETP/DP, distributed
optimizer, bf16). With the plain optimizer the state is also saved in megatron-core's reshardable form
(optimizer/, training/optim_reshard.py), which a resume under another layout loads; where that form is
missing or cannot be loaded (the distributed optimizer, EP=1 <-> EP>1: optim_reshard.load_refusal)
the weights, iteration, data position and LR schedule are restored and the optimizer starts fresh (a
warning says why). docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import warnings
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from megatron_ce import checkpoint_format as fmt
# The folder format is defined once (megatron_ce/checkpoint_format.py); these names stay importable from
# here. atomic_write is looked up through this module at call time, so a test can patch it here.
from megatron_ce.checkpoint_format import META_NAME, RELEASE, STATE, TRACKER, ModelRecord, atomic_write, iter_dir
from megatron_ce.runtime.parallel import barrier, global_rank
from megatron_ce.training import optim_reshard

__all__ = ["META_NAME", "RELEASE", "STATE", "TRACKER", "CheckpointError", "CheckpointSaveError", "atomic_write",
           "find_checkpoint", "iter_dir", "load_model_weights", "read_train_state", "read_tracker",
           "save_checkpoint", "verify_files"]


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save failed part-way (exit code 4); the previous checkpoint is kept."""


def read_tracker(root: str) -> Optional[str]:
    """The folder the tracker file names, without checking it; None when there is none or it is
    unreadable (for messages and retention, which must not fail on it: find_checkpoint reports it)."""
    try:
        return fmt.read_tracker(root)
    except fmt.FormatError:
        return None


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fmt.fsync_path(os.path.join(d, f))
        fmt.fsync_path(d)


def _sync_saves_in_process() -> None:
    """megatron-core's writer returns results through a queue it creates as a spawn-context
    multiprocessing Manager (seconds to start, per process) to serve *async* saves; our saves are
    synchronous, where a thread queue does the same job."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is None:
        filesystem_async._results_queue = queue.Queue()


# ----------------------------------------------------------------------------------------------
# what a rank holds
# ----------------------------------------------------------------------------------------------


def parallel_layout(args) -> Dict[str, Any]:
    return dict(world_size=args.world_size, tp=args.tensor_model_parallel_size,
                pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
                etp=args.expert_tensor_parallel_size,  # validate_args filled its default (= tp)
                distributed_optimizer=bool(args.use_distributed_optimizer), bf16=bool(args.bf16))


# Settings that define the trained model beyond its tensor shapes: resuming under other values would
# silently train a different model (weights-only loads with --finetune may change them).
MODEL_SETTINGS = ("num_layers", "num_moe_experts", "moe_router_topk", "moe_ce_num_compressed", "moe_ce_variant",
                  "moe_ce_split", "moe_ce_main_mass", "moe_ce_min_main", "moe_ce_max_main")
_FLAG = {"num_layers": "--num-layers", "num_moe_experts": "--num-experts", "moe_router_topk": "--moe-router-topk"}


def model_settings(config) -> Dict[str, Any]:
    return {k: getattr(config, k, None) for k in MODEL_SETTINGS}


def check_model_settings(saved: Optional[Dict[str, Any]], now: Dict[str, Any], ckpt_dir: str) -> None:
    """One-line error naming the first setting a resumed run changes (older checkpoints: no record)."""
    for k in MODEL_SETTINGS:
        if saved is not None and k in saved and saved[k] != now.get(k):
            flag = _FLAG.get(k, "--" + k.replace("_", "-"))
            raise CheckpointError(f"{ckpt_dir} was trained with {flag}={saved[k]}, this run has {now.get(k)}: "
                                  "resume with the same setting, or pass --finetune to start a new run from its weights")


def sub_optimizers(optimizer) -> List[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_rank_state(optimizer, model) -> List[Dict[str, Any]]:
    """Per sub-optimizer: the inner torch optimizer's state and the tensors it updates when they are
    separate fp32 master copies (bf16); tensors that share storage with the model's parameters (fp32
    training) are restored with the weights and saved as None."""
    model_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out = []
    for sub in sub_optimizers(optimizer):
        inner = sub.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        out.append(dict(
            inner=inner.state_dict(),
            shapes=[list(p.shape) for p in params],
            main_params=[None if p.untyped_storage().data_ptr() in model_storage else p.detach()
                         for p in params],
            grad_scaler=sub.grad_scaler.state_dict() if getattr(sub, "grad_scaler", None) else None,
        ))
    return out


def load_optimizer_rank_state(optimizer, saved: List[Dict[str, Any]]) -> Optional[str]:
    """Restore `optimizer_rank_state`; returns a reason string instead when the shapes differ."""
    subs = sub_optimizers(optimizer)
    if len(subs) != len(saved):
        return f"{len(saved)} sub-optimizers saved, {len(subs)} now"
    for sub, s in zip(subs, saved):
        params = [p for g in sub.optimizer.param_groups for p in g["params"]]
        if [list(p.shape) for p in params] != s["shapes"]:
            return "the optimizer's parameter shards differ"
        # Same tensors, other grouping (e.g. a checkpoint from before the CE tables had a group).
        if [len(g["params"]) for g in s["inner"]["param_groups"]] != [len(g["params"]) for g in sub.optimizer.param_groups]:
            return "the optimizer's parameter groups differ"
    for sub, s in zip(subs, saved):
        # torch's load_state_dict also restores each group's settings; this run's flags win (e.g. a
        # changed --moe-ce-lr-mult), and the scheduler has already set lr/wd for the resumed step.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in sub.optimizer.param_groups]
        sub.optimizer.load_state_dict(s["inner"])
        for g, kept in zip(sub.optimizer.param_groups, settings):
            g.update(kept)
        params = [p for g in sub.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            for p, t in zip(params, s["main_params"]):
                if t is not None:
                    p.copy_(t)
        if s["grad_scaler"] is not None and getattr(sub, "grad_scaler", None):
            sub.grad_scaler.load_state_dict(s["grad_scaler"])
    return None


def rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[name, torch.from_numpy(key.copy()), pos, has_gauss, gauss],
                 torch=torch.get_rng_state(), tracker=tensor_parallel.get_cuda_rng_tracker().get_states())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------


def _all_or_none(step, root: str, tmp: str) -> None:
    """Collective: run `step` (None: nothing on this rank); if it raised on any rank, every rank raises
    CheckpointSaveError naming the first failed rank, after rank 0 removed the partial folder."""
    error = None
    if step is not None:
        try:
            step()
        except Exception as e:  # OSError mostly; anything else must stop all ranks alike too
            error = e
    failed = torch.tensor([global_rank() if error is not None else -1], dtype=torch.int64)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if int(failed) < 0:
        return
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    reason = f"{type(error).__name__}: {error}" if error is not None else "see that rank's log"
    raise CheckpointSaveError(f"saving {tmp} failed on rank {int(failed)} ({reason}); the partial folder was "
                              f"removed and {read_tracker(root) or 'no checkpoint'} stays the latest")


def optimizer_dir(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, fmt.OPTIMIZER_DIR)


def _start_save(root: str, tmp: str, args) -> None:
    if global_rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by an interrupted save of this iteration
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        if optim_reshard.save_refusal(args) is None:
            os.makedirs(optimizer_dir(tmp))
    barrier()


def _write_rank_files(tmp: str, gpt_model, optimizer, args) -> None:
    """This rank's shards of the model (megatron-core's writer), of the reshardable optimizer state
    (when saved) and its exact optimizer/RNG file."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(gpt_model.sharded_state_dict(), tmp)
    if optim_reshard.save_refusal(args) is None:
        optim_reshard.save_optimizer_state(optimizer, gpt_model, optimizer_dir(tmp))
    rank_state = dict(layout=parallel_layout(args), rng=rng_state(),
                      optimizer=None if args.no_save_optim else optimizer_rank_state(optimizer, gpt_model))
    path = rank_state_path(tmp, global_rank())
    with open(path + ".part", "wb") as f:
        torch.save(rank_state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def _write_folder_files(tmp: str, state: Dict[str, Any], meta: Optional[bytes], args) -> None:
    """Rank 0: train_state.json, megatron_ce.json and the tokenizer, all durable before the rename."""
    atomic_write(os.path.join(tmp, STATE), json.dumps(state, indent=2).encode())
    if meta is not None:
        atomic_write(os.path.join(tmp, META_NAME), meta)
    if getattr(args, "tokenizer_model", None):  # the tokenizer trained with: HF exports carry it
        from megatron_ce.hf.tokenizer_files import save_tokenizer

        save_tokenizer(args.tokenizer_model, tmp, chat_template=getattr(args, "chat_template", None))
    _fsync_tree(tmp)


def _publish(root: str, tmp: str, final: str, iteration: int, meta: Optional[bytes]) -> None:
    """Rank 0: rename the finished folder into place, then point the tracker at it (the commit)."""
    if os.path.exists(final):  # re-saving an iteration: swap, then drop the old copy
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fmt.fsync_path(root)
    atomic_write(os.path.join(root, TRACKER), str(iteration).encode())
    if meta is not None:  # convenience copy for tools that look at the root
        atomic_write(os.path.join(root, META_NAME), meta)


def _meta_bytes(meta: Union[None, dict, ModelRecord]) -> Optional[bytes]:
    if meta is None:
        return None
    return json.dumps(meta.to_dict() if isinstance(meta, ModelRecord) else meta, indent=2).encode()


def save_checkpoint(root: str, iteration: int, gpt_model, optimizer, scheduler, consumed_samples: int,
                    args, meta: Union[None, dict, ModelRecord] = None) -> str:
    """Collective. Returns the final folder. `meta`: the megatron_ce.json record (models built from an
    HF config), written into the folder and at the root.

    A failed write (disk full, quota, I/O error) on any rank stops every rank alike: the failure is
    all-reduced before the next step, the partial folder is removed to free its space, and the
    previous checkpoint stays the current one."""
    _sync_saves_in_process()
    final, tmp = iter_dir(root, iteration), iter_dir(root, iteration) + ".tmp"
    meta_bytes = _meta_bytes(meta)
    _start_save(root, tmp, args)

    def commit():  # rank 0, once every rank's files are written
        state = dict(iteration=iteration, consumed_samples=consumed_samples, layout=parallel_layout(args),
                     scheduler=scheduler.state_dict(), optimizer_saved=not args.no_save_optim,
                     reshardable_optimizer=optim_reshard.saved_record(args, optimizer),
                     model=model_settings(gpt_model.config))
        _write_folder_files(tmp, state, meta_bytes, args)
        _publish(root, tmp, final, iteration, meta_bytes)

    _all_or_none(lambda: _write_rank_files(tmp, gpt_model, optimizer, args), root, tmp)
    _all_or_none(commit if global_rank() == 0 else None, root, tmp)
    return final


# ----------------------------------------------------------------------------------------------
# retention (--keep-last-checkpoints)
# ----------------------------------------------------------------------------------------------

_ITER_NAME = re.compile(r"iter_(\d{7,})")  # iter_dir: at least 7 digits
DELETING = ".deleting"


def checkpoints_to_delete(root: str, keep: int, just_saved: int) -> List[str]:
    """Folders of `root` beyond the newest `keep` training checkpoints. Only folders named iter_NNNNNNN
    that hold our train_state.json count (a converted or foreign folder is never touched); the folder
    the tracker names (the one a resume reads) and the one just saved are always kept."""
    ours = {}
    for d in os.listdir(root):
        m = _ITER_NAME.fullmatch(d)
        if m and os.path.isfile(os.path.join(root, d, STATE)):
            ours[int(m.group(1))] = os.path.join(root, d)
    protected = {os.path.normpath(p) for p in (read_tracker(root), iter_dir(root, just_saved)) if p}
    newest = sorted(ours, reverse=True)[:keep]
    return [ours[i] for i in sorted(ours) if i not in newest and os.path.normpath(ours[i]) not in protected]


_deleter: Optional[threading.Thread] = None


def _delete(paths: List[str]) -> None:
    for path in paths:
        try:
            shutil.rmtree(path)
        except OSError as e:
            warnings.warn(f"--keep-last-checkpoints: could not remove {path} ({e})", stacklevel=2)


def wait_for_pruning() -> None:
    """Until the background deletion of pruned checkpoints (if any) has finished."""
    global _deleter
    if _deleter is not None:
        _deleter.join()
        _deleter = None


def prune_checkpoints(root: str, keep: int, just_saved: int, background: bool = False) -> List[str]:
    """Collective, after save_checkpoint: once every rank has finished the save, rank 0 retires the
    checkpoints beyond the newest `keep`. Each is first renamed to iter_N.deleting (atomic: from then
    on no resume can pick it, and a crash part-way leaves a folder the next prune removes, never a
    half-deleted iter_N); the deletion itself runs in a background thread with `background` (removing
    hundreds of GB can take a while on a parallel file system, and the other ranks would wait for it
    in the next collective). Returns the retired folders (rank 0; [] elsewhere). A folder that cannot
    be removed is a warning, not an error: training goes on."""
    global _deleter
    barrier()
    if global_rank() != 0:
        return []
    wait_for_pruning()  # one deleter at a time
    doomed = [os.path.join(root, d) for d in os.listdir(root)
              if d.endswith(DELETING) and _ITER_NAME.fullmatch(d[: -len(DELETING)])]
    retired = []
    for path in checkpoints_to_delete(root, keep, just_saved):
        try:
            os.replace(path, path + DELETING)
        except OSError as e:
            warnings.warn(f"--keep-last-checkpoints: could not remove {path} ({e})", stacklevel=2)
            continue
        retired.append(path)
        doomed.append(path + DELETING)
    if background:
        _deleter = threading.Thread(target=_delete, args=(doomed,), name="checkpoint-pruning")
        _deleter.start()
    else:
        _delete(doomed)
    return retired


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------


def find_checkpoint(root: str) -> Optional[str]:
    """The folder the tracker names (None if `root` has no checkpoint). Warns about partial saves."""
    if not root or not os.path.isdir(root):
        return None
    partial = sorted(d for d in os.listdir(root) if d.endswith(".tmp") or d.endswith(".old"))
    if partial and global_rank() == 0:
        warnings.warn(f"ignoring partial checkpoint folder(s) {', '.join(partial)} in {root} "
                      "(an interrupted save)", stacklevel=2)
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        if any(d.startswith("iter_") and not d.endswith((".tmp", ".old", DELETING)) for d in os.listdir(root)):
            raise CheckpointError(f"{root} has iter_* folders but no {TRACKER}")
        return None
    try:
        path = fmt.read_tracker(root)
    except fmt.FormatError as e:
        raise CheckpointError(str(e)) from None
    if not fmt.is_dist_checkpoint(path):
        raise CheckpointError(f"{TRACKER} names {path}, which is not a complete checkpoint")
    return path


def verify_files(ckpt_dir: str) -> None:
    """Every file the checkpoint's .metadata names exists and is long enough (else a one-line
    CheckpointError naming it), checked before megatron-core reads anything."""
    from megatron_ce.convert.dist_io import DistCheckpointReader
    from megatron_ce.convert.mapping import ConversionError

    try:
        DistCheckpointReader(ckpt_dir)
    except ConversionError as e:
        raise CheckpointError(str(e)) from None
    from megatron_ce import compat

    for name in compat.DIST_CKPT_EXTRA_FILES:  # common.pt only up to megatron-core 0.18
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointError(f"{os.path.join(ckpt_dir, name)}: missing (an incomplete checkpoint)")


def load_model_weights(gpt_model, ckpt_dir: str) -> None:
    """Load weights saved at any TP/PP/EP layout. CE tables missing from the checkpoint (a base model
    converted without CE) keep their init (ones) with a warning. A missing or truncated file, or a
    tensor of another shape (another model or CE variant), is a one-line CheckpointError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_ce.convert.keys import read_legacy_keys

    verify_files(ckpt_dir)
    sharded = gpt_model.sharded_state_dict()
    saved = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    present = set(saved.keys())
    read_legacy_keys(sharded, present)  # checkpoints written before the TE-layout keys (convert/keys.py)
    for k, v in sharded.items():
        key, shape = getattr(v, "key", k), getattr(v, "global_shape", None)
        if key in saved and shape is not None and tuple(saved[key].global_shape) != tuple(shape):
            raise CheckpointError(f"{ckpt_dir}: {key} has shape {tuple(saved[key].global_shape)} there, "
                                  f"{tuple(shape)} in this model (a checkpoint of another model or CE variant?)")
    # Compressed-expert tables of another variant would otherwise be skipped and ours left at ones.
    ours_ce = {getattr(v, "key", k) for k, v in sharded.items() if ".ce." in getattr(v, "key", k)}
    foreign_ce = sorted(k for k in present if ".ce." in k and k not in ours_ce)
    if ours_ce and foreign_ce:
        raise CheckpointError(f"{ckpt_dir} holds compressed-expert table {foreign_ce[0]}, which this model does "
                              "not have (trained with another --moe-ce-variant?)")
    missing = sorted(k for k, v in sharded.items() if getattr(v, "key", k) not in present)
    ce_missing = [k for k in missing if ".ce." in k]
    # Module extra states are ShardedObjects (TEGroupedMLP names them _extra_state1, 2, ...), never tensors.
    other = [k for k in missing if ".ce." not in k and not isinstance(sharded[k], ShardedObject)]
    if other:
        raise CheckpointError(f"{ckpt_dir} lacks {len(other)} model tensors, e.g. {other[0]} "
                              "(a different model shape?)")
    for k in missing:
        sharded.pop(k)
    if ce_missing and global_rank() == 0:
        warnings.warn(f"{ckpt_dir} has no compressed-expert tables; they start at ones", stacklevel=2)
    state = dist_checkpointing.load(sharded, ckpt_dir)
    result = gpt_model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if k not in missing and not re.search(r"\._extra_state\d*$", k)]
    if bad:
        raise CheckpointError(f"loading {ckpt_dir}: {len(bad)} parameters not restored, e.g. {bad[0]}")


def read_train_state(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """train_state.json (None for weights-only checkpoints, e.g. converted ones); a damaged one is a
    one-line CheckpointError naming it."""
    try:
        return fmt.read_train_state(ckpt_dir)
    except fmt.FormatError as e:
        path = os.path.join(ckpt_dir, STATE)
        detail = str(e)[len(path):].lstrip(": ") if str(e).startswith(path) else str(e)
        if "not a training state file" in detail:
            raise CheckpointError(str(e)) from None
        raise CheckpointError(f"{path}: not a training state file ({detail})") from None


def load_resharded_optimizer(ckpt_dir: str, optimizer, gpt_model) -> None:
    """Collective: the optimizer state of optimizer/ (saved under another layout; the caller checked
    optim_reshard.load_refusal). A missing or truncated file is a one-line CheckpointError."""
    path = optimizer_dir(ckpt_dir)
    if not fmt.is_dist_checkpoint(path):
        raise CheckpointError(f"{path}: missing (train_state.json says the reshardable optimizer state was saved); "
                              "--no-load-optim starts the optimizer fresh")
    verify_files(path)
    optim_reshard.load_optimizer_state(optimizer, gpt_model, path)


def rank_state_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"rank_{rank:05d}.pt")


def load_rank_state(ckpt_dir: str, state: Dict[str, Any], same_layout: bool) -> Optional[Dict[str, Any]]:
    """This rank's optimizer/RNG file; None when the layout changed (it cannot be used). Every rank
    checks that all ranks' files are there first, so a missing one stops all ranks alike."""
    if not same_layout:
        return None
    world = int(state["layout"]["world_size"])
    for r in range(world):
        if not os.path.isfile(rank_state_path(ckpt_dir, r)):
            raise CheckpointError(f"{rank_state_path(ckpt_dir, r)}: missing (the checkpoint holds "
                                  f"{world} ranks' optimizer/RNG files); --finetune loads only the weights")
    path = rank_state_path(ckpt_dir, global_rank())
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or damaged zip: torch raises several types
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
