"""Launch scripts: DRY_RUN=1 prints the plan and the torchrun command for both models; a layout that does
not divide fails (one line naming the variable) before torchrun starts; GPU-only throughput options are
on with Transformer Engine and off with the CPU settings; --shutdown-timeout is passed only to a torchrun
whose --help has it (planner terms: tests/launch/test_plan.py)."""

import os
import shlex
import subprocess

import pytest

from tests.training.conftest import REPO

SCRIPTS = {"olmoe": "launch/sft_olmoe_ce.sh", "phimoe": "launch/sft_phimoe_ce.sh"}


# What `torchrun --help` prints about the flag (torch's run.py); older torchruns do not have it.
SHUTDOWN_HELP = "  --shutdown-timeout SHUTDOWN_TIMEOUT, --shutdown_timeout SHUTDOWN_TIMEOUT"


def _run(script, tmp_path, shutdown_flag=True, **env):
    # A fake torchrun on PATH records whether it was started; `--help` answers like a real one with or
    # without --shutdown-timeout.
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    help_text = "usage: torchrun [-h] [--nnodes NNODES]\n" + (SHUTDOWN_HELP if shutdown_flag else "")
    (fake / "torchrun").write_text(f"#!/bin/sh\nif [ \"$1\" = --help ]; then printf '%s\\n' '{help_text}'; exit 0; fi\n"
                                   f"touch {tmp_path}/torchrun_started\n")
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
    # Throughput options of megatron-core that are valid with CE (GPU settings).
    assert {"--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--moe-permute-fusion"} <= set(cmd)
    assert flag("--moe-ce-split") == "fixed" and flag("--keep-last-checkpoints") == "2"
    assert not [a for a in cmd if a.startswith("--no-") and a.endswith("-fusion")]  # the trainer's defaults
    assert "--moe-ce-lr-mult" not in cmd


def test_phimoe_default_layout_keeps_ep_inside_a_node(tmp_path):
    r = _run("phimoe", tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])

    def flag(name):
        return int(cmd[cmd.index(name) + 1])

    gpn, nnodes = flag("--nproc-per-node"), flag("--nnodes")
    assert (gpn, nnodes) == (8, 4)
    assert flag("--expert-model-parallel-size") * flag("--tensor-model-parallel-size") <= gpn
    assert "--recompute-granularity" not in cmd
    assert "launch: warning" not in r.stderr and "advice:" not in r.stdout  # fits 85% of 80 GiB
    assert "checkpoint: " in r.stdout


@pytest.mark.parametrize("has_flag", [True, False])
def test_shutdown_timeout_only_when_torchrun_has_it(tmp_path, has_flag):
    r = _run("phimoe", tmp_path, shutdown_flag=has_flag, DRY_RUN="1", SHUTDOWN_TIMEOUT="540")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "torchrun_started").exists()
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert ("--shutdown-timeout" in cmd) == has_flag
    if has_flag:
        assert cmd[cmd.index("--shutdown-timeout") + 1] == "540" and cmd.index("--shutdown-timeout") < cmd.index("-m")
    else:  # the planner names the 30 s torchrun then grants the ranks for a ~590 GB save
        assert "ranks get 30 s after SIGTERM" in r.stderr, r.stderr


def test_gpu_option_switches(tmp_path):
    r = _run("olmoe", tmp_path, DRY_RUN="1", OVERLAP="0", PERMUTE_FUSION="0", FUSIONS="0", CE_LR_MULT="4",
             KEEP_CHECKPOINTS="0")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert not {"--overlap-grad-reduce", "--overlap-param-gather", "--moe-permute-fusion",
                "--keep-last-checkpoints"} & set(cmd)
    assert {"--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--no-rope-fusion",
            "--no-gradient-accumulation-fusion"} <= set(cmd)
    assert cmd[cmd.index("--moe-ce-lr-mult") + 1] == "4"
    # The permute fusion follows the fixed split: off by default with the mass split.
    r = _run("olmoe", tmp_path, DRY_RUN="1", CE_SPLIT="mass")
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert "--moe-permute-fusion" not in cmd and cmd[cmd.index("--moe-ce-split") + 1] == "mass"


def test_runs_torchrun_when_valid(tmp_path):
    r = _run("olmoe", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "torchrun_started").exists()


@pytest.mark.parametrize("env,var", [
    (dict(EP="6"), "EP=6"),
    (dict(GPUS_PER_NODE="6", TP="4"), "TP=4"),
    (dict(GLOBAL_BATCH="100"), "GLOBAL_BATCH=100"),
    (dict(NNODES="1"), "EP=8"),  # phimoe default TP1 PP4 EP8 needs DP >= 8: 32 GPUs
    (dict(TP="x"), "TP=x"),
])
def test_bad_layout_fails_before_torchrun(tmp_path, env, var):
    model = "phimoe" if var == "EP=8" else "olmoe"
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
    # CPU settings pass no GPU-only option.
    assert not {"--overlap-grad-reduce", "--overlap-param-gather", "--moe-permute-fusion"} & set(cmd)
    assert "unfused attention" in r.stdout


@pytest.mark.parametrize("env,needle", [
    (dict(PRETRAINED=""), "set PRETRAINED"),
    (dict(PRECISION="fp16"), "PRECISION=fp16"),
    (dict(SHUTDOWN_TIMEOUT="soon"), "SHUTDOWN_TIMEOUT=soon"),
    (dict(KEEP_CHECKPOINTS="all"), "KEEP_CHECKPOINTS=all"),
    (dict(OVERLAP="yes"), "OVERLAP=yes"),
    (dict(GPU_MEM_GIB="80G"), "GPU_MEM_GIB=80G"),
    (dict(PERMUTE_FUSION="1", CE_SPLIT="mass"), "PERMUTE_FUSION=1 needs CE_SPLIT=fixed"),
    (dict(CE_VARIANT="foo"), "CE_VARIANT: invalid choice: 'foo'"),
    (dict(CE_LR_MULT="-1"), "CE_LR_MULT=-1"),
    (dict(DIST_TIMEOUT_MINUTES="soon"), "DIST_TIMEOUT_MINUTES: invalid float value: 'soon'"),
])
def test_bad_settings_fail_before_torchrun(tmp_path, env, needle):
    r = _run("olmoe", tmp_path, **env)
    assert r.returncode != 0 and not (tmp_path / "torchrun_started").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ") and needle in lines[0], r.stderr
