"""An HF export loads on its own: tokenizer files + generation_config.json beside the weights (issue 13
item 3). lm-eval's `hf` model calls AutoTokenizer.from_pretrained(export) unless given tokenizer=.

Expected ids come from the tokenizer's own files (tokenizer.json's added tokens, tokenizer_config.json's
eos/pad strings), not from the code under test."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.models.families import make_hf_model, tiny_olmoe_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer")
TEXT = "Below is an instruction. <|user|> hello world 123"


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _special_ids(tok_dir):
    """{eos, pad} ids read from the files: the strings in tokenizer_config.json, their ids in tokenizer.json."""
    with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
        ids = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    return ids[cfg["eos_token"]], ids[cfg["pad_token"]]


def _assert_self_contained(export, tok_dir):
    """The export's tokenizer encodes like tok_dir's; generation_config.json has its eos/pad ids."""
    from transformers import AutoTokenizer, GenerationConfig

    ours, ref = AutoTokenizer.from_pretrained(export), AutoTokenizer.from_pretrained(tok_dir)
    assert ours(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
    assert ours.chat_template == ref.chat_template
    gen = GenerationConfig.from_pretrained(export)
    eos, pad = _special_ids(tok_dir)
    assert (gen.eos_token_id, gen.pad_token_id) == (eos, pad)


def _hf_dir(tmp_path, with_tokenizer=False):
    """A tiny OLMoE whose config token ids (eos 5, pad 7) differ from the bundled tokenizer's (0, 1):
    the generation config must take the tokenizer's. ffn 24 <= hidden 32 and top-4 (--format reference)."""
    d = tmp_path / "hf"
    cfg = tiny_olmoe_config(vocab_size=1024, eos_token_id=5, pad_token_id=7, num_experts=6,
                            num_experts_per_tok=4, intermediate_size=24)
    make_hf_model(cfg).save_pretrained(d)
    if with_tokenizer:
        for n in os.listdir(TOKENIZER):
            shutil.copy(os.path.join(TOKENIZER, n), d / n)
    return d


def _other_tokenizer(tmp_path):
    """The bundled tokenizer with eos '<|assistant|>': another tokenizer, same vocabulary."""
    d = tmp_path / "other_tok"
    shutil.copytree(TOKENIZER, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|assistant|>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


# ---------------------------------------------------------------------------- converter-made checkpoints


@pytest.mark.parametrize("fmt", ["native", "reference"])
def test_tokenizer_flag_makes_export_self_contained(tmp_path, fmt):
    hf = _hf_dir(tmp_path)  # no tokenizer files: the converter has none to record
    to_mc, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    assert to_mc.main(["--load-dir", str(hf), "--save-dir", str(tmp_path / "mc"), "--no-progress",
                       "--moe-ce-num-compressed", "2"]) == 0
    out = tmp_path / "out"
    assert to_hf.main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(out), "--no-progress",
                       "--format", fmt, "--tokenizer", TOKENIZER]) == 0
    _assert_self_contained(out, TOKENIZER)


def test_tokenizer_flag_overrides_recorded_one(tmp_path):
    """The HF dir's tokenizer is recorded by the converter; --tokenizer replaces it (no files of both)."""
    hf = _hf_dir(tmp_path, with_tokenizer=True)
    to_mc, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    assert to_mc.main(["--load-dir", str(hf), "--save-dir", str(tmp_path / "mc"), "--no-progress"]) == 0
    assert to_hf.main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "rec"), "--no-progress"]) == 0
    _assert_self_contained(tmp_path / "rec", TOKENIZER)
    other = _other_tokenizer(tmp_path)
    assert to_hf.main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "ovr"), "--no-progress",
                       "--tokenizer", other]) == 0
    _assert_self_contained(tmp_path / "ovr", other)
    assert _special_ids(other)[0] == 4 != _special_ids(TOKENIZER)[0]  # the two really differ


def test_no_tokenizer_is_one_warning_line(tmp_path, capsys):
    from transformers import GenerationConfig

    hf = _hf_dir(tmp_path)
    os.remove(hf / "generation_config.json")  # nothing from the HF side either
    to_mc, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    assert to_mc.main(["--load-dir", str(hf), "--save-dir", str(tmp_path / "mc"), "--no-progress"]) == 0
    capsys.readouterr()
    assert to_hf.main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if "tokenizer" in l]
    assert len(err) == 1 and err[0].startswith("warning:") and "--tokenizer" in err[0], err
    gen = GenerationConfig.from_pretrained(tmp_path / "out")  # from config.json's ids
    assert (gen.eos_token_id, gen.pad_token_id) == (5, 7)


def test_unloadable_tokenizer_flag_fails_before_converting(tmp_path, capsys):
    hf = _hf_dir(tmp_path)
    to_mc, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    assert to_mc.main(["--load-dir", str(hf), "--save-dir", str(tmp_path / "mc"), "--no-progress"]) == 0
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    rc = to_hf.main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "out"), "--no-progress",
                     "--tokenizer", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --tokenizer {tmp_path / 'empty'}"), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- trainer-made checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training iteration of a small OLMoE (built from a config.json, as the launch scripts do)."""
    d = tmp_path_factory.mktemp("trained")
    cfg = json.load(open(os.path.join(REPO, "launch", "configs", "olmoe_tiny.json")))
    cfg.update(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
    (d / "config.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_ce.train", "--model-config", str(d / "config.json"),
           "--data-path", os.path.join(REPO, "examples", "data", "sft_tiny.jsonl"), "--tokenizer-model", TOKENIZER,
           "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
           "--train-iters", "1", "--no-save-optim", "--save", str(d / "save")]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return d / "save"


def _export(load_dir, out):
    args = ["--load-dir", str(load_dir), "--save-dir", str(out), "--no-progress"]
    assert _tool("convert_megatron_to_hf").main(args) == 0


def test_trainer_checkpoint_exports_its_tokenizer(trained, tmp_path):
    _export(trained, tmp_path / "out")
    _assert_self_contained(tmp_path / "out", TOKENIZER)


def test_recorded_tokenizer_is_exported(trained, tmp_path):
    """What the trainer is to write (save_tokenizer into the iteration folder) is found and exported,
    both from the save dir and from the iteration folder itself."""
    from megatron_ce.hf.tokenizer_files import find_tokenizer, save_tokenizer

    save = tmp_path / "save"
    shutil.copytree(trained, save)
    it = save / "iter_0000001"
    shutil.rmtree(it / "tokenizer", ignore_errors=True)  # (once the trainer writes it)
    assert find_tokenizer(str(save)) is None
    save_tokenizer(TOKENIZER, str(it))
    assert find_tokenizer(str(save)) == str(it / "tokenizer") == find_tokenizer(str(it))
    _export(save, tmp_path / "out")
    _assert_self_contained(tmp_path / "out", TOKENIZER)
    _export(it, tmp_path / "out_it")
    _assert_self_contained(tmp_path / "out_it", TOKENIZER)
