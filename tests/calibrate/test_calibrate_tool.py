"""tools/calibrate_ce.py end to end on a tiny converted OLMoE-CE checkpoint: the written checkpoint
(release layout, calibration record) loads in the trainer and in the HF converter with the calibrated
theta, and a layer left out keeps theta = 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ce.convert.dist_io import DistCheckpointReader
from tests.calibrate.utils import write_hf_olmoe

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
COMMON = ["--data-path", str(DATA / "sft_tiny.jsonl"), "--tokenizer-model", str(DATA / "tokenizer"),
          "--seq-length", "64", "--micro-batch-size", "2"]
TABLES = {"gate": 32, "up": 32, "down": 48}  # ia3 tables of the tiny config (d 32, f 48)


def _run(cmd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout


def _theta(ckpt_dir):
    """{table: [layers, experts, width]} read straight from a dist checkpoint."""
    reader = DistCheckpointReader(str(ckpt_dir))
    out = {}
    for role, width in TABLES.items():
        key = f"decoder.layers.mlp.ce.{role}"
        (out[role],) = reader.read([(key, (0, 0, 0), reader.shape(key))])
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from megatron_ce.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("calib")
    write_hf_olmoe(root / "hf")
    convert_hf_to_megatron(root / "hf", root / "mc", moe_ce_num_compressed=2, progress=False)
    out = _run([sys.executable, "tools/calibrate_ce.py", "--load", str(root / "mc"), "--save", str(root / "out"),
                *COMMON, "--num-samples", "8", "--holdout-samples", "4", "--calib-steps", "10",
                "--calib-layers", "1", "--calib-keep-if-worse", "--tensorboard-dir", str(root / "tb")])
    return root, out


def test_tool_writes_release_checkpoint(calibrated):
    root, stdout = calibrated
    out = root / "out"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "hf_files" / "tokenizer.json").is_file()
    for meta in (out / "megatron_ce.json", out / "release" / "megatron_ce.json"):
        rec = json.loads(meta.read_text())
        assert rec["moe_ce_num_compressed"] == 2 and rec["moe_ce_variant"] == "ia3"
        cal = rec["calibration"]
        assert cal["num_samples"] == 8 and cal["steps"] == 10 and cal["layers"] == [1]
        assert [r["layer"] for r in cal["per_layer"]] == [1]
        assert set(cal["heldout_loss"]) == {"topk", "topk_m", "topk_m_ce_before", "topk_m_ce_calibrated"}
    assert "err theta=1" in stdout and "held-out LM loss, full top-k" in stdout
    theta = _theta(out / "release")
    for role, t in theta.items():
        assert torch.equal(t[0], torch.ones_like(t[0])), role  # layer 0 left out
    moved = torch.cat([t[1].reshape(-1) for t in theta.values()])
    record = cal["per_layer"][0]
    # the record's theta statistics were taken in memory before the save: the written theta is that theta
    assert float((moved - 1).abs().max()) == pytest.approx(record["theta_max_dev"], rel=1e-6)
    assert float(moved.mean()) == pytest.approx(record["theta_mean"], rel=1e-6)
    assert record["theta_max_dev"] > 1e-3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(root / "tb"))
    ea.Reload()
    assert "calibration/rel_err_calibrated" in ea.Tags()["scalars"]


def test_converter_exports_calibrated_theta(calibrated, tmp_path):
    from megatron_ce.convert import convert_megatron_to_hf
    from tests.calibrate.utils import load_safetensors_dir

    root, _ = calibrated
    convert_megatron_to_hf(root / "out", tmp_path / "hf", progress=False)
    exported = load_safetensors_dir(tmp_path / "hf")
    theta = _theta(root / "out" / "release")
    for layer in range(2):
        for role in TABLES:
            assert torch.equal(exported[f"model.layers.{layer}.mlp.ce.{role}"], theta[role][layer]), (layer, role)


def test_trainer_loads_calibrated_theta(calibrated, tmp_path):
    """One trainer iteration at lr 0 from the calibrated checkpoint: the trainer's own save holds the
    calibrated theta unchanged (it was loaded, not re-initialised to ones)."""
    root, _ = calibrated
    _run([sys.executable, "-m", "megatron_ce.train", "--load", str(root / "out"), "--save", str(tmp_path / "t"),
          *COMMON, "--global-batch-size", "2", "--train-iters", "1", "--lr", "0", "--min-lr", "0",
          "--log-interval", "1"])
    saved = _theta(tmp_path / "t" / "iter_0000001")
    calibrated_theta = _theta(root / "out" / "release")
    for role in TABLES:
        assert torch.equal(saved[role], calibrated_theta[role]), role


def _tool_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_ce_tool", REPO / "tools" / "calibrate_ce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra,message", [
    (["--calib-layers", "0,x"], "--calib-layers=0,x must be comma-separated"),
    (["--calib-steps", "-1"], "--calib-steps=-1"),
    (["--num-samples", "0"], "--num-samples=0"),
])
def test_bad_flags_one_line(tmp_path, extra, message):
    from megatron_ce.training.args import ArgError

    tool = _tool_module()
    with pytest.raises(ArgError, match=message):
        tool.parse_args(["--load", str(tmp_path), "--save", str(tmp_path / "o"), *COMMON, *extra])
    with pytest.raises(ArgError, match="--save"):
        tool.parse_args(["--load", str(tmp_path), *COMMON])


def test_existing_save_dir_refused(calibrated):
    from megatron_ce.calibrate import CalibrationError
    from megatron_ce.calibrate.save import check_save_dir

    with pytest.raises(CalibrationError, match="already holds a checkpoint"):
        check_save_dir(str(calibrated[0] / "out"))
