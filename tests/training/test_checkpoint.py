"""Atomic checkpoints and the NaN stop, through the real entry point on one rank.

A save is killed at a given point (os._exit inside the trainer, like a crash or SIGKILL there); the
next run must resume from the previous checkpoint, warn about the partial folder and save cleanly.
"""

import pytest

from tests.training.conftest import TINY, run_train, tracker

# Runs the trainer with one checkpoint function patched to die while saving iteration 4.
CRASH = r'''
import os, runpy, sys
POINT = sys.argv.pop(1)
import megatron_ce.training.checkpoint as c
from megatron.core import dist_checkpointing

def dies(fn, when):
    def wrapped(*a, **k):
        if when(*a):
            if POINT == "after_model_write":
                fn(*a, **k)
            os._exit(9)
        return fn(*a, **k)
    return wrapped

if POINT in ("during_model_write", "after_model_write"):
    dist_checkpointing.save = dies(dist_checkpointing.save, lambda sd, d, *r: str(d).endswith("iter_0000004.tmp"))
elif POINT == "before_rename":
    c._fsync_tree = dies(c._fsync_tree, lambda d: d.endswith("iter_0000004.tmp"))
elif POINT == "before_tracker":
    c.atomic_write = dies(c.atomic_write, lambda p, data: p.endswith("latest_checkpointed_iteration.txt") and data == b"4")
sys.argv = ["megatron_ce.train"] + sys.argv[1:]
runpy.run_module("megatron_ce.train", run_name="__main__")
'''

ARGS = TINY + ["--save-interval", "2"]


def _crash_then_resume(tmp_path, point):
    save = tmp_path / "ckpt"
    res = run_train([point] + ARGS + ["--train-iters", "6", "--save", str(save)], python_code=CRASH, check=False)
    assert res.returncode == 9, res.stdout[-3000:]
    assert tracker(save) == 2  # the previous checkpoint is still the current one
    res = run_train(ARGS + ["--train-iters", "4", "--save", str(save)])
    assert f"resumed from {save / 'iter_0000002'} at iteration 2" in res.stdout
    assert tracker(save) == 4
    assert not list(save.glob("*.tmp")) and not list(save.glob("*.old"))
    return res


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    res = _crash_then_resume(tmp_path, "after_model_write")
    assert "ignoring partial checkpoint folder(s) iter_0000004.tmp" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("point", ["during_model_write", "before_rename", "before_tracker"])
def test_crash_points(tmp_path, point):
    _crash_then_resume(tmp_path, point)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    res = run_train(TINY + ["--save", str(save), "--save-interval", "1", "--train-iters", "50", "--lr", "1e4",
                            "--min-lr", "1e4", "--clip-grad", "0"], check=False)
    assert res.returncode == 3, res.stdout[-3000:]
    assert "stopping (the last good checkpoint" in res.stdout
    last = tracker(save)
    assert last is not None and last < 50
    assert (save / f"iter_{last:07d}" / "train_state.json").is_file()


# The disk fills up while this rank writes its optimizer/RNG file of iteration 4.
DISK_FULL = r'''
import errno, os, runpy, sys, torch
real_save = torch.save
def save(obj, f, *a, **k):
    if hasattr(f, "write") and "iter_0000004.tmp/rank_" in str(getattr(f, "name", "")):
        f.write(b"\0" * 4096)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
    return real_save(obj, f, *a, **k)
torch.save = save
sys.argv = ["megatron_ce.train"] + sys.argv[1:]
runpy.run_module("megatron_ce.train", run_name="__main__")
'''


def test_disk_full_during_save(tmp_path):
    """A save that fails part-way with an error (not a crash): exit code 4, one line naming the folder
    and the OS error, the partial folder removed, the previous checkpoint still the latest; the next run
    resumes from it."""
    save = tmp_path / "ckpt"
    res = run_train(ARGS + ["--train-iters", "6", "--save", str(save)], python_code=DISK_FULL, check=False)
    assert res.returncode == 4, res.stdout[-3000:]
    err = [ln for ln in res.stdout.splitlines() if ln.startswith("megatron_ce.train:")]
    assert len(err) == 1 and "Traceback" not in res.stdout, res.stdout[-3000:]
    assert f"saving {save / 'iter_0000004.tmp'} failed on rank 0 (OSError: [Errno 28] No space left on device" in err[0]
    assert f"{save / 'iter_0000002'} stays the latest" in err[0]
    assert tracker(save) == 2 and not (save / "iter_0000004.tmp").exists()
    res = run_train(ARGS + ["--train-iters", "4", "--save", str(save)])
    assert f"resumed from {save / 'iter_0000002'} at iteration 2" in res.stdout
    assert tracker(save) == 4
