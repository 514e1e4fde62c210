"""The checkpoint manager's policy (issue 14): when to save, what to prune, where to resume from, each
against a hand-written expectation for a folder laid out by hand. No process group: rank 0 alone.

Also: building the model resolves its settings (CE defaults, padded vocabulary) without writing them
back into the parsed flags."""

import argparse
import json

import pytest

from megatron_ce.training import checkpoint as ckpt
from megatron_ce.training.args import ArgError
from megatron_ce.training.checkpoint_manager import CheckpointManager
from tests.dist_harness import run_distributed
from tests.training.conftest import TINY, run_train, tracker


def _args(**kw):
    base = dict(save=None, load=None, pretrained_checkpoint=None, finetune=False, save_interval=None,
                keep_last_checkpoints=None, exit_signal_handler=False, exit_signal="SIGTERM")
    base.update(kw)
    return argparse.Namespace(**base)


def _ckpt(root, name, iteration=None):
    """A checkpoint folder: .metadata, plus train_state.json for a trained one (iteration given)."""
    d = root / name
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x")
    if iteration is not None:
        (d / "train_state.json").write_text(json.dumps({"iteration": iteration, "consumed_samples": 4 * iteration}))
    return d


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.setattr(ckpt, "global_rank", lambda: 0)
    monkeypatch.setattr(ckpt, "barrier", lambda: None)


def test_save_every_interval_and_once_at_the_end(tmp_path):
    m = CheckpointManager(_args(save=str(tmp_path), save_interval=3))
    assert [i for i in range(1, 10) if m.should_save(i)] == [3, 6, 9]
    assert m.should_save(7, final=True)  # nothing saved yet
    m.last_saved = 7
    assert not m.should_save(7, final=True)  # the interval (or a signal) already saved it
    assert m.should_save(8, final=True)


def test_no_interval_saves_only_at_the_end_and_no_save_dir_never(tmp_path):
    m = CheckpointManager(_args(save=str(tmp_path)))
    assert not any(m.should_save(i) for i in range(1, 20)) and m.should_save(20, final=True)
    m = CheckpointManager(_args())
    assert not m.should_save(5, final=True) and not m.should_save(0, final=True)
    assert m.kept() == "no checkpoint was saved"


def test_resume_from_the_tracked_training_checkpoint(tmp_path):
    root = tmp_path / "save"
    _ckpt(root, "iter_0000002", 2)
    _ckpt(root, "iter_0000004", 4)
    (root / "latest_checkpointed_iteration.txt").write_text("2")  # the tracker wins, not the newest folder
    path, state = CheckpointManager(_args(save=str(root))).resume_source()
    assert path == str(root / "iter_0000002") and state["iteration"] == 2 and state["consumed_samples"] == 8
    # --finetune: the same folder's weights, no training state.
    assert CheckpointManager(_args(load=str(root), finetune=True)).resume_source() == (str(root / "iter_0000002"), None)


def test_resume_weights_only_from_release_or_pretrained(tmp_path):
    save = tmp_path / "save"
    _ckpt(save, "release")
    (save / "latest_checkpointed_iteration.txt").write_text("release")
    assert CheckpointManager(_args(save=str(save))).resume_source() == (str(save / "release"), None)
    pre = _ckpt(tmp_path, "pretrained")
    empty = tmp_path / "empty"
    assert CheckpointManager(_args(save=str(empty), pretrained_checkpoint=str(pre))).resume_source() == (str(pre), None)
    # A checkpoint to resume in --save wins over --pretrained-checkpoint.
    assert CheckpointManager(_args(save=str(save), pretrained_checkpoint=str(pre))).resume_source()[0] == str(
        save / "release")
    assert CheckpointManager(_args(save=str(empty))).resume_source() == (None, None)


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(ArgError, match=r"^--load=\S+ holds no checkpoint \(latest_checkpointed_iteration.txt missing\)$"):
        CheckpointManager(_args(load=str(tmp_path))).resume_source()
    with pytest.raises(ArgError, match="--pretrained-checkpoint=.* is not a megatron-core dist checkpoint"):
        CheckpointManager(_args(pretrained_checkpoint=str(tmp_path))).resume_source()
    root = tmp_path / "save"
    _ckpt(root, "iter_0000003", 3)
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    (root / "iter_0000003" / "train_state.json").write_text('{"iter')
    with pytest.raises(ckpt.CheckpointError, match=r"iter_0000003/train_state.json: not a training state file") as e:
        CheckpointManager(_args(save=str(root))).resume_source()
    assert "\n" not in str(e.value)
    (root / "latest_checkpointed_iteration.txt").write_text("latest")
    with pytest.raises(ckpt.CheckpointError, match="expected 'release' or an iteration number"):
        CheckpointManager(_args(save=str(root))).resume_source()


def test_prune_keeps_the_newest_and_the_tracked(tmp_path):
    root = tmp_path / "save"
    for it in (2, 4, 6, 8):
        _ckpt(root, f"iter_{it:07d}", it)
    _ckpt(root, "release")  # not ours: never pruned
    (root / "latest_checkpointed_iteration.txt").write_text("4")  # e.g. the save of 8 is not committed yet
    assert CheckpointManager(_args(save=str(root))).prune(8) == []  # no --keep-last-checkpoints: keep all
    m = CheckpointManager(_args(save=str(root), keep_last_checkpoints=1))
    assert m.prune(8) == [str(root / "iter_0000002"), str(root / "iter_0000006")]
    m.close()  # waits for the background deletion
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000008", "latest_checkpointed_iteration.txt",
                                                      "release"]
    m.last_saved = 8
    assert m.kept() == f"the last good checkpoint {root / 'iter_0000008'} is kept"


def _build(rank, world_size, argv):
    from megatron_ce.runtime import destroy_parallel, init_parallel
    from megatron_ce.training.args import parse_args
    from megatron_ce.training.model import build_model

    init_parallel(timeout_s=120)
    try:
        args = parse_args(argv, world_size=1)
        before = dict(vars(args))
        _, settings = build_model(args, 1000)
        return before == vars(args), settings.moe_ce_num_compressed, settings.moe_ce_variant, settings.padded_vocab_size
    finally:
        destroy_parallel()


def test_model_settings_are_returned_not_written_into_args():
    argv = [a for i, a in enumerate(TINY) if a != "--moe-ce-num-compressed" and TINY[i - 1] != "--moe-ce-num-compressed"]
    unchanged, k_a, variant, vocab = run_distributed(_build, 1, argv + ["--train-iters", "1"], timeout=180, cuda=False)
    # No CE flags: the record format's defaults; 1000 tokens padded to a multiple of 128.
    assert (unchanged, k_a, variant, vocab) == (True, 0, "ia3", 1024)


def test_eval_interval_without_an_eval_split_trains(tmp_path):
    """--eval-interval with no --eval-split-fraction (no eval split): nothing to evaluate, the run goes on
    (it used to stop with a TypeError traceback at the first eval)."""
    res = run_train(TINY + ["--train-iters", "2", "--eval-interval", "1", "--save", str(tmp_path / "ckpt")])
    assert "eval loss" not in res.stdout and tracker(tmp_path / "ckpt") == 2
