"""Resume and resharding through the real entry point (`torchrun -m megatron_ce.train`, gloo, CPU).

One straight run A (2 ranks, EP=2, 6 iterations, checkpoints every 2) is shared by the tests:
- kill/resume: run B (same flags) is SIGKILLed as soon as its first checkpoint lands, then resumed;
  every per-step loss (TensorBoard, fp32) equals A's exactly;
- resharded load: A's iteration-2 checkpoint (EP=2) loaded at EP=1 on one rank: the loss of
  iteration 3 matches A's within 1e-5;
- TensorBoard: A's events hold every named scalar.
"""

import shutil
from pathlib import Path

import pytest

from tests.training.conftest import TINY, run_train, run_until, tb_scalars, tracker

ITERS = 6
# B trains "forever" on A's schedule (--lr-decay-iters fixes the cosine), so the kill always lands
# mid-run whatever the machine's speed; C finishes A's 6 iterations.
COMMON = TINY + ["--lr-decay-iters", str(ITERS), "--save-interval", "2", "--eval-split-fraction", "0.05",
                 "--eval-interval", "3"]
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    res = run_train(COMMON + EP2 + ["--train-iters", str(ITERS), "--save", str(root / "ckpt"),
                                    "--tensorboard-dir", str(root / "tb")], nproc=2, timeout=300)
    return root, res.stdout


def _copy_checkpoint(src_root: Path, iteration: int, dst_root: Path) -> Path:
    dst_root.mkdir(parents=True)
    name = f"iter_{iteration:07d}"
    shutil.copytree(src_root / name, dst_root / name)
    (dst_root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dst_root


def test_kill_and_resume_reproduces_losses(straight, tmp_path):
    root, _ = straight
    a = tb_scalars(root / "tb", "train/loss")
    assert sorted(a) == list(range(1, ITERS + 1))

    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    run_until(COMMON + EP2 + ["--train-iters", "1000", "--save", str(save), "--tensorboard-dir", str(tb)],
              nproc=2, predicate=lambda: tracker(save) is not None, timeout=300)
    k = tracker(save)
    assert k is not None and k < ITERS, f"killed too late (checkpoint {k})"
    res = run_train(COMMON + EP2 + ["--train-iters", str(ITERS), "--save", str(save), "--tensorboard-dir", str(tb)],
                    nproc=2, timeout=300)
    assert f"resumed from {save / f'iter_{k:07d}'} at iteration {k}" in res.stdout
    assert "optimizer state not restored" not in res.stdout
    b = tb_scalars(tb, "train/loss")
    assert sorted(b) == list(range(1, ITERS + 1))
    assert [b[i] for i in range(1, ITERS + 1)] == [a[i] for i in range(1, ITERS + 1)]


def test_resharded_load_ep2_to_ep1(straight, tmp_path):
    root, _ = straight
    a = tb_scalars(root / "tb", "train/loss")
    save = _copy_checkpoint(root / "ckpt", 2, tmp_path / "ckpt")
    res = run_train(COMMON + ["--train-iters", "3", "--save", str(save), "--tensorboard-dir", str(tmp_path / "tb")],
                    nproc=1, timeout=240)
    assert "optimizer state not restored" in res.stdout  # other layout: weights only, with a warning
    got = tb_scalars(tmp_path / "tb", "train/loss")
    assert abs(got[3] - a[3]) <= 1e-5, (got[3], a[3])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2"]], ids=["tp2-sp", "pp2"])
def test_resharded_load_ep2_to_tp_pp(straight, tmp_path, layout):
    root, _ = straight
    a = tb_scalars(root / "tb", "train/loss")
    save = _copy_checkpoint(root / "ckpt", 2, tmp_path / "ckpt")
    run_train(COMMON + layout + ["--train-iters", "3", "--save", str(save), "--tensorboard-dir", str(tmp_path / "tb")],
              nproc=2, timeout=300)
    got = tb_scalars(tmp_path / "tb", "train/loss")
    assert abs(got[3] - a[3]) <= 1e-5, (got[3], a[3])


def test_tensorboard_scalars(straight):
    root, stdout = straight
    tags = tb_scalars(root / "tb")
    expected = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/aux_loss",
                "moe/load_min", "moe/load_max", "moe/load_cv", "moe/aux_mass", "moe/main_per_token",
                "moe/lb_loss", "moe/aux_loss",
                "eval/loss"]
    for layer in (1, 2):
        expected += [f"moe/load_cv/layer_{layer:02d}", f"moe/aux_mass/layer_{layer:02d}"]
        for vec in ("gate", "up", "down"):
            expected += [f"theta/{vec}_{s}/layer_{layer:02d}" for s in ("mean", "std", "min", "max")]
    missing = [t for t in expected if t not in tags]
    assert not missing, f"missing scalars {missing}; have {sorted(tags)}"
    assert sorted(tags["eval/loss"]) == [3, 6]
    assert set(tags["train/loss"]) == set(range(1, ITERS + 1))
    # theta moves away from its init (ones) and the compressed experts get routing mass
    assert tags["theta/gate_max/layer_01"][ITERS] > 1.0 or tags["theta/gate_min/layer_01"][ITERS] < 1.0
    assert 0.0 < tags["moe/aux_mass"][ITERS] < 1.0
    assert tags["moe/main_per_token"][ITERS] == 2.0  # fixed split: top-4 = 2 main + 2 compressed
    # the log line and where things are
    assert "| loss " in stdout and "aux mass" in stdout and "load cv" in stdout
    assert f"tensorboard --logdir {root / 'tb'}" in stdout
