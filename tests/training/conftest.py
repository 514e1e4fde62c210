"""Helpers for the training tests: run the trainer as a subprocess (its own process group, hard
timeout, killed with the whole group) and read TensorBoard scalars back.

Tests marked `slow` run only with RUN_SLOW=1 (or `-m slow`): CI has 2 cores.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"

# A 2-layer CE MoE GPT on the bundled data: ~0.1 s a step on one core.
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--moe-ffn-hidden-size", "64", "--num-experts", "8", "--moe-router-topk", "4", "--moe-router-pre-softmax",
    "--moe-ce-num-compressed", "2", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--data-path", str(DATA / "sft_tiny.jsonl"), "--tokenizer-model", str(DATA / "tokenizer"),
    "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer multi-process test (run with RUN_SLOW=1 or -m slow)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session: touch only this folder's tests
        if "slow" in item.keywords and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def train_cmd(args, nproc=1, python_code=None):
    """Command line of the trainer: plain python for 1 rank, torchrun otherwise."""
    if python_code is not None:  # a wrapper that patches something, then runs the trainer
        return [sys.executable, "-c", python_code, *args]
    if nproc == 1:
        return [sys.executable, "-m", "megatron_ce.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", "megatron_ce.train", *args]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def kill_group(proc):
    """SIGKILL the process, its process group and every descendant (torchrun starts its workers in
    sessions of their own)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(10)
    psutil.wait_procs(procs, timeout=10)


def run_train(args, nproc=1, timeout=240, python_code=None, check=True):
    """Run to completion; returns CompletedProcess (stdout+stderr in .stdout). Hard timeout."""
    proc = subprocess.Popen(train_cmd(args, nproc, python_code), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out = proc.stdout.read() if proc.stdout else ""
        raise AssertionError(f"trainer timed out after {timeout}s:\n{out[-4000:]}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, None)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}:\n{out[-6000:]}")
    return res


def run_until(args, nproc, predicate, timeout=240):
    """Start the trainer, SIGKILL its whole process group as soon as predicate() is true."""
    proc = subprocess.Popen(train_cmd(args, nproc), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not predicate():
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited ({proc.returncode}) before the kill point")
            if time.monotonic() > deadline:
                raise AssertionError(f"kill point not reached in {timeout}s")
            time.sleep(0.01)
    finally:
        kill_group(proc)


def tb_scalars(log_dir, tag=None):
    """{tag: {step: value}} (or {step: value} for one tag) from a TensorBoard log dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    out = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    return out[tag] if tag else out


def tracker(save_dir):
    p = Path(save_dir) / "latest_checkpointed_iteration.txt"
    try:
        return int(p.read_text())
    except (OSError, ValueError):
        return None
