"""Determinism, eval split, collation, CLI flags, and the bundled tiny data / tokenizer."""

import argparse
import filecmp
import os
import runpy
import sys

import torch

from megatron_ce.data import add_sft_data_args, build_sft_dataset, build_sft_dataset_from_args

from .conftest import EXAMPLES
from .helpers import collate

ALPACA = str(EXAMPLES / "sft_tiny.jsonl")


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    return len(a) == len(b) and all(x[k].equal(y[k]) for x, y in zip(a, b) for k in x)


def test_deterministic_shuffle_and_split(tok):
    for packing in ("reference", "boundary", "none"):
        a_tr, a_ev, _ = build_sft_dataset(ALPACA, tok, 128, packing=packing, split_eval=0.1, seed=11)
        b_tr, b_ev, _ = build_sft_dataset(ALPACA, tok, 128, packing=packing, split_eval=0.1, seed=11)
        c_tr, _, _ = build_sft_dataset(ALPACA, tok, 128, packing=packing, split_eval=0.1, seed=12)
        assert _same(_items(a_tr), _items(b_tr)) and _same(_items(a_ev), _items(b_ev))
        assert not _same(_items(a_tr), _items(c_tr))
    # the held-out split is disjoint from train, covers every row, and does not depend on seq_length
    tr, ev, stats = build_sft_dataset(ALPACA, tok, 128, packing="none", split_eval=0.1, seed=11)
    locs_tr, locs_ev = set(tr.locations), set(ev.locations)
    assert not locs_tr & locs_ev and len(locs_tr | locs_ev) == 400 and len(locs_ev) == 40
    assert stats.eval_samples == 40 and stats.eval_sequences == 40
    _, ev2, _ = build_sft_dataset(ALPACA, tok, 256, packing="boundary", split_eval=0.1, seed=11)
    assert set(ev2.locations) == locs_ev
    # shuffle=False keeps file order
    tr, _, _ = build_sft_dataset(ALPACA, tok, 128, packing="none", shuffle=False)
    assert tr.locations == [f"{ALPACA}:{k}" for k in range(1, 401)]


def test_dataloader_batches(tok):
    tr, _, _ = build_sft_dataset(ALPACA, tok, 64, packing="boundary")
    batch = next(iter(torch.utils.data.DataLoader(tr, batch_size=4)))
    assert batch["tokens"].shape == (4, 64) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["cu_seqlens"].shape == (4, 65)
    assert batch["tokens"].equal(collate([tr[i] for i in range(4)])["tokens"])


def test_cli_flags(tok):
    p = argparse.ArgumentParser()
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    add_sft_data_args(p)
    args = p.parse_args(["--data-path", ALPACA, "--tokenizer-model", str(EXAMPLES / "tokenizer"),
                         "--sft-format", "chat", "--eval-split-fraction", "0.05", "--data-max-rows", "100"])
    tr, ev, stats, t = build_sft_dataset_from_args(args)
    assert tr.packing == "boundary" and stats.rows_read == 100 and stats.eval_samples == 5
    assert t.eos_token == tok.eos_token


def test_bundled_files_are_small_and_regenerate_identically(tmp_path, monkeypatch):
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(EXAMPLES) for f in fs
                if "__pycache__" not in r)
    assert total < 2 * 2 ** 20
    monkeypatch.setattr(sys, "argv", ["make_tiny_data.py", "--out", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "make_tiny_data.py"), run_name="__main__")
    for f in ("sft_tiny.jsonl", "chat_tiny.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
              "tokenizer/chat_template.jinja"):
        assert filecmp.cmp(tmp_path / f, EXAMPLES / f, shallow=False), f


def test_hub_names_and_task_presets_go_through_datasets(tok, monkeypatch):
    """No network here: `datasets.load_dataset` is replaced; the pipeline must ask it for the preset's
    hub name and split, and wrap a failure into a one-line DataError."""
    import datasets
    import pytest

    from megatron_ce.data import DataError

    calls = []
    fake = {
        "TIGER-Lab/MathInstruct": [{"source": "s", "instruction": "1+1?", "output": "2"}],
        "ise-uiuc/Magicoder-Evol-Instruct-110K": [{"instruction": "hi", "response": "print(1)"}],
        "allenai/tulu-3-sft-mixture": [{"id": "x", "source": "s", "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
    }

    def load_dataset(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        if name not in fake:
            raise ConnectionError("offline\nsecond line")
        return datasets.Dataset.from_list(fake[name])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for task, resp in (("math", "2"), ("coding", "print(1)"), ("general", "Hello")):
        tr, _, _ = build_sft_dataset(None, tok, 128, task=task, packing="none")
        assert tok.decode(tr.sample(0)[0]).endswith(f"### Response:\n{resp}<|endoftext|>")
        assert tr.locations == [f"{calls[-1][0]}:row 1"]
    assert [c[0] for c in calls] == list(fake) and all(c[2] == "train" for c in calls)
    with pytest.raises(DataError) as ei:
        build_sft_dataset("someone/missing", tok, 128)
    assert str(ei.value).startswith("someone/missing: cannot load split 'train' from the Hugging Face hub")
    assert "\n" not in str(ei.value)


def test_chat_template_from_file(tok, tmp_path):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tr, _, _ = build_sft_dataset(ALPACA, tok, 128, fmt="chat", chat_template=str(t), max_rows=1, packing="none")
    ids, flags = tr.sample(0)
    assert tok.decode(ids).startswith("user: ") and tok.decode(ids[flags == 1]).endswith("\n<|endoftext|>")
