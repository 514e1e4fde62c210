"""Launch scripts: DRY_RUN=1 prints the torchrun command for both models; a layout that does not
divide fails (one line naming the variable) before torchrun starts."""

import os
import shlex
import subprocess

import pytest

from tests.training.conftest import REPO

SCRIPTS = {"olmoe": "launch/sft_olmoe_ce.sh", "phimoe": "launch/sft_phimoe_ce.sh"}


def _run(script, tmp_path, **env):
    # A fake torchrun on PATH records whether it was started.
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "torchrun").write_text(f"#!/bin/sh\ntouch {tmp_path}/torchrun_started\n")
    (fake / "torchrun").chmod(0o755)
    e = {k: v for k, v in os.environ.items() if k not in ("NNODES", "EP", "TP", "PP", "GPUS_PER_NODE")}
    e.update(PATH=f"{fake}:{os.environ['PATH']}", PRETRAINED="/ckpt/converted", TOKENIZER="org/model")
    e.update(env)
    return subprocess.run(["bash", SCRIPTS[script]], cwd=REPO, env=e, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("model,k_a,lr", [("olmoe", "4", "2e-5"), ("phimoe", "1", "1e-5")])
def test_dry_run(tmp_path, model, k_a, lr):
    r = _run(model, tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "torchrun_started").exists()
    assert "memory per GPU (estimate, GiB)" in r.stdout
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert cmd[0] == "torchrun" and "megatron_ce.train" in cmd

    def flag(name):
        return cmd[cmd.index(name) + 1]

    assert flag("--moe-ce-num-compressed") == k_a and flag("--lr") == lr
    assert flag("--seq-length") == "4096" and flag("--global-batch-size") == "128"
    assert flag("--lr-decay-style") == "cosine" and flag("--lr-warmup-fraction") == "0.03"
    assert flag("--moe-token-dispatcher-type") == "alltoall"
    assert "--bf16" in cmd and "--moe-grouped-gemm" in cmd


def test_runs_torchrun_when_valid(tmp_path):
    r = _run("olmoe", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "torchrun_started").exists()


@pytest.mark.parametrize("env,var", [
    (dict(EP="6"), "EP=6"),
    (dict(GPUS_PER_NODE="6", TP="4"), "TP=4"),
    (dict(GLOBAL_BATCH="100"), "GLOBAL_BATCH=100"),
    (dict(NNODES="1"), "EP=16"),  # phimoe default EP=16 needs 16 GPUs
    (dict(TP="x"), "TP=x"),
])
def test_bad_layout_fails_before_torchrun(tmp_path, env, var):
    model = "phimoe" if var == "EP=16" else "olmoe"
    r = _run(model, tmp_path, **env)
    assert r.returncode != 0
    assert not (tmp_path / "torchrun_started").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ") and var in lines[0], r.stderr


def test_cpu_settings_and_reliability_flags(tmp_path):
    r = _run("olmoe", tmp_path, DRY_RUN="1", PRETRAINED="", MODEL_CONFIG="launch/configs/olmoe_tiny.json",
             PRECISION="fp32", GROUPED_GEMM="0", TRANSFORMER_IMPL="local", TRAIN_ITERS="7",
             DIST_TIMEOUT_MINUTES="2.5", SHUTDOWN_TIMEOUT="45", GPUS_PER_NODE="2", EP="2")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert "--bf16" not in cmd and "--moe-grouped-gemm" not in cmd and "--pretrained-checkpoint" not in cmd
    assert "--epochs" not in cmd and cmd[cmd.index("--train-iters") + 1] == "7"
    assert cmd[cmd.index("--model-config") + 1] == "launch/configs/olmoe_tiny.json"
    assert cmd[cmd.index("--distributed-timeout-minutes") + 1] == "2.5"
    assert cmd[cmd.index("--shutdown-timeout") + 1] == "45"
    assert "--exit-signal-handler" in cmd


@pytest.mark.parametrize("env,needle", [
    (dict(PRETRAINED=""), "set PRETRAINED"),
    (dict(PRECISION="fp16"), "PRECISION=fp16"),
    (dict(SHUTDOWN_TIMEOUT="soon"), "SHUTDOWN_TIMEOUT=soon"),
])
def test_bad_settings_fail_before_torchrun(tmp_path, env, needle):
    r = _run("olmoe", tmp_path, **env)
    assert r.returncode != 0 and not (tmp_path / "torchrun_started").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ") and needle in lines[0], r.stderr
