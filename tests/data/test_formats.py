"""Prompt formats and loss masks (alpaca / reference vs chat / assistant-only), tokenizers, presets."""

import json

import numpy as np
import pytest

from megatron_ce.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, build_sft_dataset
from megatron_ce.data.formatting import Example, tokenize_examples

from .conftest import EXAMPLES
from .helpers import assistant_text, masked_target_ids, write_jsonl

CHAT = str(EXAMPLES / "chat_tiny.jsonl")
ALPACA = str(EXAMPLES / "sft_tiny.jsonl")


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_chat_mode_loss_mask_excludes_prompt_tokens(tok):
    rows = _rows(CHAT)
    train, _, stats = build_sft_dataset(CHAT, tok, 256, fmt="chat", packing="none", shuffle=False)
    assert stats.dropped == 0 and len(train) == len(rows)
    for i, row in enumerate(rows):
        item = train[i]
        assert train.row_samples(i) == [i]
        # trained targets are exactly the assistant turns (+ their eos), nothing of system/user/template
        assert tok.decode(masked_target_ids(item)) == assistant_text(row["messages"], tok.eos_token)
        ids, flags = train.sample(i)
        text = tok.decode(ids[flags == 0])  # tokens that are never targets
        for m in row["messages"]:
            if m["role"] != "assistant":
                assert m["content"] in text
        assert "<|user|>" in text and "<|assistant|>" in text


def test_reference_mode_loss_on_every_token(tok):
    train, _, stats = build_sft_dataset(ALPACA, tok, 128, fmt="alpaca", packing="reference", shuffle=False)
    n = len(train)
    for i in range(n):
        item = train[i]
        L = int((item["document_ids"] >= 0).sum())
        assert L == (128 if i < n - 1 else train.num_tokens - 128 * (n - 1))
        # every position but a chunk's last has a target and is in the loss, prompt tokens included
        assert item["loss_mask"][: L - 1].eq(1).all() and item["loss_mask"][L - 1:].eq(0).all()
        assert item["position_ids"][:L].tolist() == list(range(L))  # no reset: the reference
        assert item["document_ids"][:L].eq(0).all()  # attention crosses samples: one document
    assert stats.train_loss_tokens == sum(float(train[i]["loss_mask"].sum()) for i in range(n))
    # prompt words are trained on
    assert "Below is an instruction" in tok.decode(masked_target_ids(train[0]))


def test_alpaca_prompt_text_and_eos(tok):
    rows = _rows(ALPACA)
    train, _, _ = build_sft_dataset(ALPACA, tok, 256, fmt="alpaca", packing="none", shuffle=False)
    for k in range(20):
        r = rows[k]
        ids, flags = train.sample(k)
        if r.get("input"):
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=r["instruction"], input=r["input"])
        else:
            prompt = ALPACA_PROMPT.format(instruction=r["instruction"])
        assert tok.decode(ids) == prompt + r["output"] + tok.eos_token
        assert ids[-1] == tok.eos_token_id and flags.all()
    assert ALPACA_PROMPT.format(instruction="X") + "Y" == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nX\n\n### Response:\nY")


def test_alpaca_response_only_loss(tok):
    rows = _rows(ALPACA)
    train, _, _ = build_sft_dataset(ALPACA, tok, 256, fmt="alpaca", packing="none", loss_on="response",
                                    shuffle=False)
    for k in range(20):
        item = train[k]
        assert tok.decode(masked_target_ids(item)) == rows[k]["output"] + tok.eos_token


def test_alpaca_rows_in_chat_format_and_boundary_packing(tok):
    rows = _rows(ALPACA)
    train, _, _ = build_sft_dataset(ALPACA, tok, 128, fmt="chat", shuffle=False)
    assert train.packing == "boundary"
    for i in range(len(train)):
        item = train[i]
        want = "".join(rows[k]["output"] + tok.eos_token for k in train.row_samples(i))
        assert tok.decode(masked_target_ids(item)) == want


def test_sentencepiece_tokenizer(spm_tok, tmp_path):
    rows = [{"instruction": "What is 2 + 3?", "output": "2 + 3 = 5."},
            {"instruction": "Reverse the word \"apple\".", "output": "elppa"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    for loss_on in ("all", "response"):
        train, _, _ = build_sft_dataset(path, spm_tok, 128, fmt="alpaca", packing="none", shuffle=False,
                                        loss_on=loss_on)
        for k, r in enumerate(rows):
            ids, flags = train.sample(k)
            assert ids[0] == spm_tok.bos_token_id and ids[-1] == spm_tok.eos_token_id
            text = spm_tok.decode(ids, skip_special_tokens=True)
            assert text.endswith(r["output"]) and "### Response:" in text
            if loss_on == "response":
                got = spm_tok.decode(ids[flags.astype(bool)], skip_special_tokens=True)
                assert got.strip() == r["output"]
    # chat with a template given explicitly (the sentencepiece tokenizer has none)
    tmpl = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
    train, _, _ = build_sft_dataset(path, spm_tok, 128, fmt="chat", packing="none", shuffle=False,
                                    chat_template=tmpl)
    for k, r in enumerate(rows):
        ids, flags = train.sample(k)
        got = spm_tok.decode(ids[flags.astype(bool)], skip_special_tokens=True)
        assert got.strip() == r["output"]  # assistant content (+ template newline + appended eos)
        assert ids[-1] == spm_tok.eos_token_id and flags[-1] == 1


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_offsets_and_piecewise_tokenization_agree(tok, fmt):
    rows = _rows(CHAT)[:40]
    exs = [Example(f"x:{k}", instruction=r["messages"][-2]["content"], response=r["messages"][-1]["content"],
                   messages=r["messages"]) for k, r in enumerate(rows)]
    a = tokenize_examples(exs, tok, fmt, loss_on="response", use_offsets=True)
    b = tokenize_examples(exs, tok, fmt, loss_on="response", use_offsets=False)
    for (ia, fa), (ib, fb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(fa, fb)


def test_task_presets_field_layouts(tok, tmp_path):
    math = write_jsonl(tmp_path / "math.jsonl", [{"source": "x", "instruction": "1+1?", "output": "2"}])
    code = write_jsonl(tmp_path / "code.jsonl", [{"instruction": "print 1", "response": "print(1)"}])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"id": "a", "source": "s", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Second"}]}])
    for task, path, resp in (("math", math, "2"), ("coding", code, "print(1)"), ("general", gen, "Hello")):
        train, _, _ = build_sft_dataset(path, tok, 128, task=task, packing="none")
        text = tok.decode(train.sample(0)[0])
        assert text.startswith("Below is an instruction") and text.endswith(f"### Response:\n{resp}<|endoftext|>")
    # general in chat format: the first user/assistant pair only (the reference's choice)
    train, _, _ = build_sft_dataset(gen, tok, 128, task="general", fmt="chat")
    assert tok.decode(train.sample(0)[0]) == "<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>"
    # generic messages data in chat format: every turn
    train, _, _ = build_sft_dataset(gen, tok, 128, fmt="chat")
    assert tok.decode(masked_target_ids(train[0])) == "Hello<|endoftext|>Second<|endoftext|>"


def test_json_parquet_and_dataset_sources_match_jsonl(tok, tmp_path):
    import datasets

    rows = [dict(r, input=r.get("input", "")) for r in _rows(ALPACA)[:50]]  # uniform columns for arrow
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    ref, _, _ = build_sft_dataset(write_jsonl(tmp_path / "a.jsonl", rows), tok, 128, packing="boundary", seed=3)
    for src in (tmp_path / "a.json", tmp_path / "a.parquet", datasets.Dataset.from_list(rows)):
        other, _, _ = build_sft_dataset(src, tok, 128, packing="boundary", seed=3,
                                        cache_dir=str(tmp_path / "cache"))
        assert len(other) == len(ref)
        for i in range(len(ref)):
            for k in ("tokens", "loss_mask", "position_ids", "document_ids"):
                assert other[i][k].equal(ref[i][k])
    # a folder: every .jsonl/.json/.parquet file in it, in sorted order, each with its own layout
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", rows)
    (d / "sub" / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    write_jsonl(d / "b.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Yo"}]}])
    (d / "notes.txt").write_text("ignored")
    tr, _, stats = build_sft_dataset(str(d), tok, 128, shuffle=False, packing="none")
    assert stats.rows_read == 2 * 50 + 1
    assert [tr.locations[k] for k in (0, 50, 51)] == [f"{d}/a.jsonl:1", f"{d}/b.jsonl:1", f"{d}/sub/a.json:1"]


def test_span_tokens_fallback_when_a_character_has_no_token():
    """Characters no token covers (e.g. dropped by a normalizer) fall back to the offsets: a token is
    in the span if it holds one of its characters."""
    from types import SimpleNamespace

    from megatron_ce.data.formatting import _span_tokens

    offsets = [(0, 3), (3, 4), (5, 8), (8, 9), (9, 9)]  # char 4 has no token; (9, 9) is zero-width

    class Enc:
        encodings = [SimpleNamespace(offsets=offsets)]

        def char_to_token(self, i, c):
            return next((j for j, (s, e) in enumerate(offsets) if s <= c < e), None)

    assert _span_tokens(Enc(), 0, 4, 9) == (2, 4)  # starts on the uncovered char 4
    assert _span_tokens(Enc(), 0, 2, 4) == (0, 2)  # straddling token 0 is in
    assert _span_tokens(Enc(), 0, 4, 5) == (0, 0)  # nothing holds char 4
    assert _span_tokens(Enc(), 0, 9, 10) == (4, 5)  # zero-width token inside the span
