"""Multi-node and rank failures through the real launch script, two "nodes" on this machine
(NNODES=2, NODE_RANK=0/1, MASTER_ADDR=127.0.0.1, 2 gloo ranks each, EP=2 across the node boundary).

Reference: the same tiny OLMoE-CE SFT as one node of 4 ranks (6 iterations, checkpoints every 2).
- two nodes: every per-step loss equals the reference's exactly;
- a rank SIGKILLed mid-step (after its backward, before the optimizer step): every node exits non-zero
  within a bounded time, the launcher names the dead rank, the last checkpoint is intact, and a restart
  resumes from it and reproduces the reference's losses;
- a rank stopped (SIGSTOP: alive but silent, the case a dead peer's closed socket does not reveal):
  the others give up after --distributed-timeout-minutes instead of torch's default 30 minutes.
"""

import json
import signal
import time

import psutil
import pytest

from tests.training.conftest import tb_scalars, tracker
from tests.training.launch_utils import ITERS, run, start, wait_all, wait_for

pytestmark = pytest.mark.timeout(600)


def losses(save):
    return tb_scalars(save / "tensorboard", "train/loss")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    save = tmp_path_factory.mktemp("single") / "ckpt"
    run(save, nnodes=1, per_node=4)
    ref = losses(save)
    assert sorted(ref) == list(range(1, ITERS + 1))
    return ref


def test_two_nodes_equal_one_node(single, tmp_path):
    save = tmp_path / "ckpt"
    nodes = run(save, nnodes=2, per_node=2)
    assert "world 4 = TP 1 x PP 1 x DP 4; EP 2" in nodes[0].text()
    assert losses(save) == single
    # Every rank of both nodes wrote its part of the last checkpoint.
    last = save / f"iter_{ITERS:07d}"
    assert sorted(p.name for p in last.glob("rank_*.pt")) == [f"rank_{r:05d}.pt" for r in range(4)]


def _complete(ckpt_dir):
    state = json.loads((ckpt_dir / "train_state.json").read_text())
    return (ckpt_dir / ".metadata").is_file() and len(list(ckpt_dir.glob("rank_*.pt"))) == 4 and state


def test_rank_killed_mid_step_then_restart(single, tmp_path):
    save = tmp_path / "ckpt"
    nodes = start(save, nnodes=2, per_node=2, MEGATRON_CE_FAULT="sigkill:rank=3:iter=5")
    t_kill = wait_for(nodes, "MEGATRON_CE_FAULT: SIGKILL in iteration 5", timeout=300)
    codes = wait_all(nodes, timeout=240)
    assert codes[0] != 0 and codes[1] != 0
    # Bounded: the peers see the closed connections at once; the collective timeout (1 min here) is the
    # backstop. Generous for a loaded 2-core machine.
    assert max(n.exited_at for n in nodes) - t_kill < 90
    out1 = nodes[1].text()
    assert "rank      : 3 (local_rank: 1)" in out1 and "Signal 9 (SIGKILL)" in out1
    assert "launch: error: torchrun exited 1 on node 1/2" in out1
    assert "launch: error: torchrun exited 1 on node 0/2" in nodes[0].text()

    # Checkpoint 4 (saved before the kill) is the one the tracker names, and complete.
    assert tracker(save) == 4
    assert _complete(save / "iter_0000004")["iteration"] == 4
    assert not (save / "iter_0000006").exists()

    nodes = run(save, nnodes=2, per_node=2)
    assert f"resumed from {save / 'iter_0000004'} at iteration 4" in nodes[0].text()
    assert "optimizer state not restored" not in nodes[0].text()
    assert losses(save) == single


def test_stuck_rank_times_out(tmp_path):
    save = tmp_path / "ckpt"
    timeout_s = 12
    nodes = start(save, nnodes=2, per_node=2, TRAIN_ITERS="1000", DIST_TIMEOUT_MINUTES=str(timeout_s / 60),
                  SAVE_INTERVAL="1000")
    wait_for(nodes, "iter      2/1000", timeout=300)
    # Node 1's rank 3 (torchrun's child whose RANK is 3) stops answering, without dying.
    workers = psutil.Process(nodes[1].proc.pid).children(recursive=True)
    victim = next(p for p in workers if p.environ().get("RANK") == "3")
    victim.send_signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        codes = wait_all(nodes, timeout=180)
    finally:
        if victim.is_running():
            victim.send_signal(signal.SIGCONT)
            victim.kill()
    assert codes[0] != 0 and codes[1] != 0
    # The collective timeout, then torchrun's shutdown of the stopped rank (SIGTERM, which a stopped
    # process never handles, then SIGKILL after torch's fixed 30 s), plus slack for a loaded machine;
    # torch's default collective timeout would be 30 minutes.
    elapsed = max(n.exited_at for n in nodes) - t_stop
    assert elapsed < timeout_s + 30 + 30, elapsed
    text = nodes[0].text() + nodes[1].text()
    assert f"Timed out waiting {timeout_s * 1000}ms" in text, text[-3000:]


@pytest.mark.parametrize("target", ["launcher", "every process"])
def test_sigterm_saves_and_exits(single, tmp_path, target):
    """Preemption: SIGTERM to the launch script (which forwards it to the ranks), or to every process
    of the job as SLURM does. The ranks finish the iteration, save and exit 0; a restart resumes and
    reproduces the reference (the run trains "forever" on the reference's LR schedule, so the signal
    lands mid-run whatever the machine's speed)."""
    save = tmp_path / "ckpt"
    nodes = start(save, nnodes=1, per_node=4, TRAIN_ITERS="1000", SAVE_INTERVAL="1000",
                  EXTRA_ARGS=f"--lr-decay-iters {ITERS}")
    wait_for(nodes, "iter      1/1000", timeout=300)
    launcher = psutil.Process(nodes[0].proc.pid)
    procs = [launcher] + (launcher.children(recursive=True) if target == "every process" else [])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = wait_all(nodes, timeout=180)
    out = nodes[0].text()
    k = tracker(save)
    assert k is not None and 1 <= k < ITERS, out[-3000:]
    assert f"received SIGTERM: stopped after iteration {k}, saved {save / f'iter_{k:07d}'}" in out
    assert _complete(save / f"iter_{k:07d}")["iteration"] == k
    if target == "launcher":
        assert codes == [0], out[-3000:]  # torchrun saw every rank exit 0
        nodes = run(save, nnodes=1, per_node=4)
        assert f"resumed from {save / f'iter_{k:07d}'} at iteration {k}" in nodes[0].text()
        assert losses(save) == single
    # With "every process", torchrun itself also got the signal: it reports it and exits non-zero after
    # the ranks are done; the checkpoint is what matters.
