"""--keep-last-checkpoints N (issue 12 item 8): after a save, only the newest N training checkpoints
stay; the one the tracker names, the one just saved and anything that is not our iteration checkpoint
are never deleted."""

from pathlib import Path

import pytest

from megatron_ce.training import checkpoint as ckpt
from megatron_ce.training.args import ArgError, parse_args
from tests.training.conftest import TINY, run_train, tracker


def _ckpt(root: Path, it: int, ours: bool = True) -> Path:
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x")
    if ours:
        (d / "train_state.json").write_text('{"iteration": %d}' % it)
    return d


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A save folder as a long run leaves it, plus things retention must not touch; rank 0, no
    process group."""
    monkeypatch.setattr(ckpt, "global_rank", lambda: 0)
    monkeypatch.setattr(ckpt, "barrier", lambda: None)
    r = tmp_path / "ckpt"
    for it in (2, 4, 6, 8):
        _ckpt(r, it)
    _ckpt(r, 1, ours=False)  # e.g. a converted checkpoint copied here: no train_state.json
    (r / "iter_0000010.tmp").mkdir()  # a save in progress / interrupted
    (r / "release").mkdir()
    (r / "iter_notes").mkdir()
    (r / "iter_0000005").write_text("a file, not a folder")
    return r


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_keeps_newest_n(root):
    (root / ckpt.TRACKER).write_text("8")
    removed = ckpt.prune_checkpoints(str(root), 2, 8)
    assert sorted(Path(p).name for p in removed) == ["iter_0000002", "iter_0000004"]
    assert _names(root) == ["iter_0000001", "iter_0000005", "iter_0000006", "iter_0000008", "iter_0000010.tmp",
                            "iter_notes", ckpt.TRACKER, "release"]


def test_never_deletes_the_tracked_or_just_saved_checkpoint(root):
    # The tracker still names 4 (say the tracker write of 8 is what failed): 4 is what a resume reads.
    (root / ckpt.TRACKER).write_text("4")
    ckpt.prune_checkpoints(str(root), 1, 8)
    assert [n for n in _names(root) if n.startswith("iter_000000") and "." not in n] == [
        "iter_0000001", "iter_0000004", "iter_0000005", "iter_0000008"]
    # just_saved is kept even if it is not among the newest (re-saving an older iteration).
    (root / ckpt.TRACKER).write_text("8")
    ckpt.prune_checkpoints(str(root), 1, 4)
    assert {"iter_0000004", "iter_0000008"} <= set(_names(root)) and "iter_0000006" not in _names(root)


def test_interrupted_delete_is_finished_later(root):
    (root / ckpt.TRACKER).write_text("8")
    (root / "iter_0000006").rename(root / "iter_0000006.deleting")  # a crash between rename and rmtree
    ckpt.prune_checkpoints(str(root), 3, 8)
    assert "iter_0000006.deleting" not in _names(root)
    assert {"iter_0000002", "iter_0000004", "iter_0000008"} <= set(_names(root))


def test_background_deletion(root):
    """The trainer's mode: retired folders are renamed at once (no resume can pick them), their
    deletion finishes in a thread."""
    (root / ckpt.TRACKER).write_text("8")
    retired = ckpt.prune_checkpoints(str(root), 1, 8, background=True)
    assert sorted(Path(p).name for p in retired) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert not any((root / f"iter_{i:07d}").exists() for i in (2, 4, 6))
    ckpt.wait_for_pruning()
    assert not any(n.endswith(".deleting") for n in _names(root)) and (root / "iter_0000008").is_dir()


def test_other_ranks_delete_nothing(root, monkeypatch):
    monkeypatch.setattr(ckpt, "global_rank", lambda: 1)
    (root / ckpt.TRACKER).write_text("8")
    assert ckpt.prune_checkpoints(str(root), 1, 8) == []
    assert (root / "iter_0000002").is_dir()


def test_flag_validation():
    base = TINY + ["--train-iters", "2"]
    with pytest.raises(ArgError, match="--keep-last-checkpoints=0 must be >= 1"):
        parse_args(base + ["--save", "x", "--keep-last-checkpoints", "0"], world_size=1)
    with pytest.raises(ArgError, match="--keep-last-checkpoints needs --save"):
        parse_args(base + ["--keep-last-checkpoints", "2"], world_size=1)
    assert parse_args(base, world_size=1).keep_last_checkpoints is None  # default: keep all


def test_training_run_keeps_last_two(tmp_path):
    """Through the trainer: a save every iteration, N = 2; then a resume from the newest."""
    save = tmp_path / "ckpt"
    args = TINY + ["--save", str(save), "--save-interval", "1", "--keep-last-checkpoints", "2"]
    res = run_train(args + ["--train-iters", "4"])
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000004"], res.stdout[-2000:]
    assert tracker(save) == 4 and "removed old checkpoint(s) iter_0000002" in res.stdout
    res = run_train(args + ["--train-iters", "5"])
    assert f"resumed from {save / 'iter_0000004'} at iteration 4" in res.stdout
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
