"""The optimizer state resumes under another parallel layout (issue #15 item 6), through the real entry
point (gloo, CPU).

Reference: one uninterrupted world-1 run of 4 iterations (checkpoint at 2). Resumed: its iteration-2
checkpoint loaded at TP=2 with sequence parallelism (2 ranks): the Adam moments come from the checkpoint's optimizer/ folder,
resharded, so iteration 4's loss (after the first resumed update) must equal the reference's up to the
TP=2 arithmetic. The same resume with the optimizer started fresh (--no-load-optim: what every layout
change did before) must land clearly farther: the check has teeth. Iteration 3's loss (before any
resumed update) matches either way and shows the weights were loaded.
"""

import json
import shutil
from pathlib import Path

from tests.training.conftest import TINY, run_train, tb_scalars

ITERS = 4
COMMON = TINY + ["--train-iters", str(ITERS), "--save-interval", "2"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
TOL = 1e-5  # world 1 vs TP=2 arithmetic (as the weights-only reshard test in test_resume.py)


def _resume_from(ref_ckpt: Path, root: Path, extra, nproc):
    """Copy the reference's iteration-2 checkpoint to root/ckpt and train from it to ITERS."""
    (root / "ckpt").mkdir(parents=True)
    shutil.copytree(ref_ckpt / "iter_0000002", root / "ckpt" / "iter_0000002")
    (root / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    res = run_train(COMMON + extra + ["--save", str(root / "ckpt"), "--tensorboard-dir", str(root / "tb")],
                    nproc=nproc, timeout=240)
    return res.stdout, tb_scalars(root / "tb", "train/loss")


def test_optimizer_state_resharded_world1_to_tp2(tmp_path):
    ref = run_train(COMMON + ["--save", str(tmp_path / "ref"), "--tensorboard-dir", str(tmp_path / "ref_tb")],
                    timeout=240)
    a = tb_scalars(tmp_path / "ref_tb", "train/loss")
    saved = tmp_path / "ref" / "iter_0000002"
    assert (saved / "optimizer" / ".metadata").is_file(), ref.stdout[-3000:]
    assert json.loads((saved / "train_state.json").read_text())["reshardable_optimizer"]["saved"]

    out, got = _resume_from(tmp_path / "ref", tmp_path / "tp2", TP2, nproc=2)
    assert "optimizer state resharded from layout world_size=1 tp=1" in out, out[-3000:]
    assert "optimizer state not restored" not in out
    _, fresh = _resume_from(tmp_path / "ref", tmp_path / "fresh", ["--no-load-optim"], nproc=1)

    assert abs(got[3] - a[3]) <= TOL and abs(fresh[3] - a[3]) <= TOL, (a, got, fresh)  # the weights
    assert abs(got[4] - a[4]) <= TOL, f"resharded optimizer: iteration 4 loss {got[4]} vs uninterrupted {a[4]}"
    assert abs(fresh[4] - a[4]) > 10 * TOL, f"a fresh optimizer gives the same loss ({fresh[4]} vs {a[4]}): no teeth"
    # The TP=2 run saved the reshardable form too (its final checkpoint).
    assert (tmp_path / "tp2" / "ckpt" / "iter_0000004" / "optimizer" / ".metadata").is_file()
