"""When the trainer saves, what it keeps and where it resumes from: one object, `CheckpointManager`,
owns --save / --save-interval, --keep-last-checkpoints, --exit-signal-handler and the resume flags
(--load, --finetune, --pretrained-checkpoint, --no-load-optim, --no-load-rng).

The policy (should_save, resume_source, kept) reads only flags and folders, so it is tested without
a process group (tests/training/test_checkpoint_manager.py); the actions (load, restore, save, prune)
are collectives over every rank and use the file protocol of training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

from megatron_ce.training import checkpoint as ckpt
from megatron_ce.training import optim_reshard
from megatron_ce.training.args import ArgError
from megatron_ce.training.metrics import print0
from megatron_ce.training.resilience import ExitSignalHandler


@dataclass
class Resume:
    """What a run starts from: a checkpoint folder (None: fresh weights), its training state (None:
    weights only) and this rank's optimizer/RNG file (None: not usable or not wanted)."""

    source: Optional[str] = None
    state: Optional[Dict[str, Any]] = None
    rank_state: Optional[Dict[str, Any]] = None
    same_layout: bool = False  # the checkpoint was written under this run's TP/PP/EP/ETP/DP layout
    model: Any = None  # the unwrapped model the weights went into (a resharded optimizer load maps its params)


class CheckpointManager:
    def __init__(self, args):
        self.args = args
        self.root: Optional[str] = args.save
        self.interval: Optional[int] = args.save_interval
        self.keep: Optional[int] = args.keep_last_checkpoints
        self.last_saved: Optional[int] = None  # the iteration whose checkpoint is the latest (this run or resumed)
        # Installed at construction, i.e. first in set-up: a signal during set-up is acted on after the
        # first iteration.
        self.exit_handler = ExitSignalHandler(args.exit_signal) if args.exit_signal_handler else None

    # -- policy ---------------------------------------------------------------------------------

    def should_save(self, iteration: int, final: bool = False) -> bool:
        """Save after `iteration`? Every --save-interval iterations; at the end of the run (`final`:
        the last iteration or a signal stop) unless that iteration's checkpoint is already the latest."""
        if not self.root:
            return False
        if final:
            return self.last_saved != iteration
        return bool(self.interval) and iteration % self.interval == 0

    def resume_source(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(checkpoint folder, its training state or None): resume from --load (default --save) if it
        has a checkpoint; weights only (state None) from a converted 'release' checkpoint there, with
        --finetune, or from --pretrained-checkpoint when there is nothing to resume; else (None, None)."""
        args = self.args
        path = ckpt.find_checkpoint(args.load or args.save) if (args.load or args.save) else None
        if args.load and path is None:
            raise ArgError(f"--load={args.load} holds no checkpoint ({ckpt.TRACKER} missing)")
        if path is not None:
            return path, None if args.finetune else ckpt.read_train_state(path)
        if args.pretrained_checkpoint:
            path = ckpt.find_checkpoint(args.pretrained_checkpoint) or args.pretrained_checkpoint
            if not os.path.isfile(os.path.join(path, ".metadata")):
                raise ArgError(f"--pretrained-checkpoint={args.pretrained_checkpoint} is not a megatron-core dist "
                               f"checkpoint (no .metadata) nor a folder with {ckpt.TRACKER}")
            return path, None
        return None, None

    def kept(self) -> str:
        """Which checkpoint a stopped run leaves behind (for its one-line message)."""
        if self.last_saved is None or not self.root:
            return "no checkpoint was saved"
        return f"the last good checkpoint {ckpt.iter_dir(self.root, self.last_saved)} is kept"

    def stop_requested(self, iteration: int, train_iters: int) -> bool:
        """Collective: did any rank receive --exit-signal (checked only while iterations remain)?"""
        return self.exit_handler is not None and iteration < train_iters and self.exit_handler.agreed()

    # -- actions (collective) -------------------------------------------------------------------

    def load(self, gpt) -> Resume:
        """The model weights from the resume source, and this rank's optimizer/RNG file when usable."""
        source, state = self.resume_source()
        if source is None:
            return Resume()
        if state is not None:  # checked before the weights: a changed setting is the likelier mistake
            ckpt.check_model_settings(state.get("model"), ckpt.model_settings(gpt.config), source)
        ckpt.load_model_weights(gpt, source)
        print0(f"loaded model weights from {source}")
        if state is None:
            return Resume(source)
        args = self.args
        same = state["layout"] == ckpt.parallel_layout(args)
        rank_state = ckpt.load_rank_state(source, state, same and not (args.no_load_optim and args.no_load_rng))
        self.last_saved = state["iteration"]
        return Resume(source, state, rank_state, same, model=gpt)

    def restore(self, resume: Resume, optimizer, scheduler) -> Tuple[int, int]:
        """Scheduler, optimizer and RNG from a training checkpoint (weights are already loaded).
        Returns (iteration, consumed samples): (0, 0) without a training state. The optimizer state
        and RNG need the same layout."""
        state, rank_state, args = resume.state, resume.rank_state, self.args
        if state is None:
            return 0, 0
        scheduler.load_state_dict(state["scheduler"])
        reason = self._optimizer_not_restored(resume, optimizer)
        if reason is not None:
            optimizer.reload_model_params()  # master weights from the loaded model weights
            print0(f"WARNING: optimizer state not restored ({reason}); weights, iteration, data position and "
                   "LR schedule restored, the optimizer starts fresh")
        if resume.same_layout and rank_state is not None and not args.no_load_rng:
            ckpt.set_rng_state(rank_state["rng"])
        print0(f"resumed from {resume.source} at iteration {state['iteration']} "
               f"({state['consumed_samples']} samples consumed)")
        return state["iteration"], state["consumed_samples"]

    def _optimizer_not_restored(self, resume: Resume, optimizer) -> Optional[str]:
        """Load the optimizer state; the reason when it cannot be (None: restored)."""
        if not resume.same_layout:
            return self._reshard_optimizer(resume, optimizer)
        if self.args.no_load_optim or resume.rank_state is None or resume.rank_state["optimizer"] is None:
            return "no optimizer state saved, or --no-load-optim"
        return ckpt.load_optimizer_rank_state(optimizer, resume.rank_state["optimizer"])

    def _reshard_optimizer(self, resume: Resume, optimizer) -> Optional[str]:
        """Collective: under another layout, the reshardable optimizer state (optimizer/) when this run
        can load it (decided up front from train_state.json and this run's flags, alike on every rank)."""
        before, now = resume.state["layout"], ckpt.parallel_layout(self.args)
        refusal = optim_reshard.load_refusal(resume.state.get("reshardable_optimizer"), self.args, optimizer)
        if refusal is not None:
            return f"layout {_short(before)} -> {_short(now)}: {refusal}"
        ckpt.load_resharded_optimizer(resume.source, optimizer, resume.model)
        print0(f"optimizer state resharded from layout {_short(before)} to {_short(now)}")
        return None

    def save(self, iteration: int, gpt, optimizer, scheduler, consumed: int, record=None,
             gathered: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        """Write the checkpoint of `iteration` (inside `gathered()`: the weights complete on every rank,
        training/ddp.py params_gathered), then retire the ones beyond --keep-last-checkpoints."""
        with gathered():
            path = ckpt.save_checkpoint(self.root, iteration, gpt, optimizer, scheduler, consumed, self.args, record)
        self.last_saved = iteration
        print0(f"saved checkpoint {path}")
        self.prune(iteration)

    def prune(self, just_saved: int) -> List[str]:
        if not self.keep:
            return []
        removed = ckpt.prune_checkpoints(self.root, self.keep, just_saved, background=True)
        if removed:
            print0(f"removed old checkpoint(s) {', '.join(os.path.basename(p) for p in removed)} "
                   f"(--keep-last-checkpoints={self.keep})")
        return removed

    def close(self) -> None:
        """End of the run: background deletions finished, the signal handler removed."""
        ckpt.wait_for_pruning()
        if self.exit_handler is not None:
            self.exit_handler.restore()


def _short(layout: Dict[str, Any]) -> str:
    """A parallel layout (training/checkpoint.py parallel_layout) on one line: world=2 tp=2 pp=1 ..."""
    return " ".join(f"{k}={v}" for k, v in layout.items())
