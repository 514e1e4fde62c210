"""Bad flags give one-line errors naming the flag (exit code 2), before any process group starts."""

import subprocess
import sys

import pytest

from megatron_ce.training.args import ArgError, parse_args
from tests.training.conftest import REPO, TINY

BASE = [a for a in TINY]


def _replace(args, flag, value):
    out = list(args)
    if flag in out:
        i = out.index(flag)
        if value is None:
            del out[i:i + 2]
        else:
            out[i + 1] = value
    else:
        out += [flag, value]
    return out


@pytest.mark.parametrize("change,world,flag", [
    (("--global-batch-size", "6"), 2, "--global-batch-size"),
    (("--num-experts", "6"), 4, "--num-experts"),  # EP=4 below
    (("--tensor-model-parallel-size", "3"), 2, "--tensor-model-parallel-size"),
    (("--moe-ce-num-compressed", "4"), 1, "--moe-ce-num-compressed"),
    (("--num-layers", "3"), 2, "--num-layers"),  # PP=2 below
    (("--num-attention-heads", "3"), 1, "--hidden-size"),
    (("--lr-decay-style", "wobbly"), 1, "--lr-decay-style"),
    (("--min-lr", "1.0"), 1, "--min-lr"),
    (("--lr-warmup-fraction", "1.5"), 1, "--lr-warmup-fraction"),
    (("--save-interval", "10"), 1, "--save-interval"),
    (("--moe-token-dispatcher-type", "flex"), 1, "--moe-token-dispatcher-type"),
    (("--micro-batch-size", "0"), 1, "--micro-batch-size"),
    (("--hidden-size", None), 1, "--hidden-size"),
    (("--tokenizer-model", None), 1, "--tokenizer-model"),
])
def test_bad_flags(change, world, flag):
    args = _replace(BASE + ["--train-iters", "2"], *change)
    if flag == "--num-experts":
        args += ["--expert-model-parallel-size", "4", "--global-batch-size", "8"]
    if flag == "--num-layers":
        args += ["--pipeline-model-parallel-size", "2"]
    with pytest.raises(ArgError) as e:
        parse_args(args, world_size=world)
    msg = str(e.value)
    assert flag in msg and "\n" not in msg, msg


def test_more_rules():
    with pytest.raises(ArgError, match="--sequence-parallel"):
        parse_args(BASE + ["--train-iters", "2", "--tensor-model-parallel-size", "2"], world_size=2)
    with pytest.raises(ArgError, match="exactly one of --train-iters and --epochs"):
        parse_args(BASE + ["--train-iters", "2", "--epochs", "1"], world_size=1)
    with pytest.raises(ArgError, match="--expert-model-parallel-size=4"):
        parse_args(BASE + ["--train-iters", "2", "--expert-model-parallel-size", "4"], world_size=2)
    with pytest.raises(ArgError, match="--num-layers conflicts with --model-config"):
        parse_args(BASE + ["--train-iters", "2", "--model-config", "x.json"], world_size=1)
    a = parse_args(BASE + ["--epochs", "2", "--expert-model-parallel-size", "2"], world_size=2)
    assert (a.data_parallel_size, a.num_microbatches) == (2, 1)


def test_cli_prints_one_line_and_exits_2():
    r = subprocess.run([sys.executable, "-m", "megatron_ce.train", *BASE, "--train-iters", "2", "--global-batch-size", "3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["megatron_ce.train: error: --global-batch-size=3 must be divisible by --micro-batch-size=2 "
                     "x data-parallel size 1"], r.stderr
