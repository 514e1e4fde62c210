"""Damaged or foreign checkpoints, tokenizers and datasets stop the trainer with exit code 2 and one
line on stderr naming the file (or flag) and the problem, before anything trains; never a traceback,
never a silent partial load. (The data pipeline's own cases are in tests/data/test_bad_data.py; here
two of them go through the command line.)

One good checkpoint (1 rank, 2 iterations) is damaged in a copy per case."""

import json
import shutil
import subprocess
import sys

import pytest

from megatron_ce import compat

from tests.training.conftest import REPO, TINY, _env, run_train

pytestmark = pytest.mark.timeout(300)

IT = "iter_0000002"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    run_train(TINY + ["--train-iters", "2", "--save", str(root / "ckpt")], timeout=240)
    return root / "ckpt"


def _damaged(good, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good, ckpt)
    damage(ckpt / IT)
    return ckpt


def _fails(args, *needles):
    r = subprocess.run([sys.executable, "-m", "megatron_ce.train", *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr[-3000:]
    # Informational lines (e.g. the data summary's warnings) may precede it; the error is one line.
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron_ce.train:")]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _first(d, pattern):
    return sorted(d.glob(pattern))[0]


CASES = {
    "missing data file": (lambda d: _first(d, "*.distcp").unlink(), ["__0_0.distcp", "missing"]),
    "truncated data file": (lambda d: _truncate(_first(d, "*.distcp")), ["__0_0.distcp", "truncated"]),
    "missing rank file": (lambda d: (d / "rank_00000.pt").unlink(), ["rank_00000.pt", "missing"]),
    "truncated rank file": (lambda d: _truncate(d / "rank_00000.pt"), ["rank_00000.pt", "unreadable"]),
    "bad train state": (lambda d: (d / "train_state.json").write_text("{\"iter"), ["train_state.json",
                                                                                   "not a training state"]),
    "tracker names a missing folder": (lambda d: shutil.rmtree(d), [IT, "not a complete checkpoint"]),
}
if "common.pt" in compat.DIST_CKPT_EXTRA_FILES:  # megatron-core 0.19 writes none
    CASES["missing common.pt"] = (lambda d: (d / "common.pt").unlink(), ["common.pt", "missing"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_checkpoint(good, tmp_path, case):
    damage, needles = CASES[case]
    ckpt = _damaged(good, tmp_path, damage)
    _fails(TINY + ["--train-iters", "4", "--save", str(ckpt)], "checkpoint error:", str(ckpt), *needles)


def test_other_ce_setting_refused_on_resume(good, tmp_path):
    ckpt = _damaged(good, tmp_path, lambda d: None)
    args = [a if a != "2" or TINY[i - 1] != "--moe-ce-num-compressed" else "1" for i, a in enumerate(TINY)]
    _fails(args + ["--train-iters", "4", "--save", str(ckpt)],
           f"{ckpt / IT} was trained with --moe-ce-num-compressed=2, this run has 1", "--finetune")


def test_other_ce_variant_refused_even_with_finetune(good, tmp_path):
    ckpt = _damaged(good, tmp_path, lambda d: None)
    _fails(TINY + ["--moe-ce-variant", "hidden", "--train-iters", "4", "--load", str(ckpt), "--finetune",
                   "--save", str(tmp_path / "new")],
           "compressed-expert table", "another --moe-ce-variant")


def test_other_model_shape_refused(good, tmp_path):
    ckpt = _damaged(good, tmp_path, lambda d: None)
    args = [a if a != "64" or TINY[i - 1] != "--moe-ffn-hidden-size" else "48" for i, a in enumerate(TINY)]
    _fails(args + ["--train-iters", "4", "--load", str(ckpt), "--finetune", "--save", str(tmp_path / "new")],
           "has shape", "another model")


@pytest.mark.parametrize("vocab,needle", [(1000, "token ids would index past"), (4096, "another model")])
def test_tokenizer_and_model_vocab_disagree(tmp_path, vocab, needle):
    cfg = json.loads((REPO / "launch/configs/olmoe_tiny.json").read_text())
    cfg["vocab_size"] = vocab
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tiny_data = [a for i, a in enumerate(TINY) if i >= TINY.index("--data-path")]  # data + training flags
    _fails(["--model-config", str(tmp_path / "config.json"), *tiny_data, "--train-iters", "1"],
           "--tokenizer-model=", f"has 1024 tokens but the model's vocabulary has {vocab}", needle)


@pytest.mark.parametrize("content,needle", [
    (b'{"instruction": "a", "output": "b"}\n{"question": "a", "answer": "b"}\n', ":2: missing field 'instruction'"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n', ":2: invalid UTF-8"),
])
def test_bad_dataset(tmp_path, content, needle):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    args = list(TINY)
    args[args.index("--data-path") + 1] = str(data)
    _fails(args + ["--train-iters", "1"], "data error:", f"{data}{needle}")
