"""Bad data stops with `file:line: reason` (one line); empty and over-length rows are counted."""

import json
import logging

import pytest

from megatron_ce.data import DataError, build_sft_dataset, read_rows

from .helpers import write_jsonl

GOOD = {"instruction": "What is 1 + 1?", "output": "1 + 1 = 2."}


def _err(path, tok, **kw):
    with pytest.raises(DataError) as ei:
        build_sft_dataset(path, tok, 128, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_malformed_jsonl_line(tok, tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": "y",}', GOOD])
    msg = _err(p, tok)
    assert msg.startswith(f"{p}:3: malformed JSON")


def test_missing_field(tok, tmp_path):
    p = write_jsonl(tmp_path / "miss.jsonl", [GOOD, {"instruction": "no answer"}])
    assert _err(p, tok) == f"{p}:2: missing field 'output'"
    p = write_jsonl(tmp_path / "null.jsonl", [GOOD, GOOD, GOOD, {"instruction": None, "output": "x"}])
    assert _err(p, tok) == f"{p}:4: missing field 'instruction'"
    p = write_jsonl(tmp_path / "type.jsonl", [{"instruction": "x", "output": 3}])
    assert _err(p, tok) == f"{p}:1: field 'output' must be a string, got int"
    p = write_jsonl(tmp_path / "notobj.jsonl", [GOOD, [1, 2]])
    assert _err(p, tok) == f"{p}:2: expected a JSON object, got list"
    p = write_jsonl(tmp_path / "layout.jsonl", [{"question": "x", "answer": "y"}])
    assert _err(p, tok).startswith(f"{p}:1: cannot tell the row layout")
    # a task preset names the fields it needs
    p = write_jsonl(tmp_path / "code.jsonl", [{"instruction": "x", "output": "y"}])
    assert _err(p, tok, task="coding") == f"{p}:1: missing field 'response'"


def test_bad_messages(tok, tmp_path):
    u = {"role": "user", "content": "hi"}
    a = {"role": "assistant", "content": "hello"}
    cases = [
        ({"messages": [u]}, "field 'messages' has no assistant message"),
        ({"messages": [u, {"role": "assistant"}]}, "messages[1]: missing field 'content'"),
        ({"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
        ({"messages": [u, a, 5]}, "messages[2] must be an object, got int"),
    ]
    for k, (row, reason) in enumerate(cases):
        p = write_jsonl(tmp_path / f"m{k}.jsonl", [{"messages": [u, a]}, {"messages": [u, a]}, row])
        assert _err(p, tok, fmt="chat") == f"{p}:3: {reason}"
    p = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [u, u]}])
    assert _err(p, tok, fmt="alpaca") == f"{p}:1: field 'messages' has no assistant message after the first user message"


def test_invalid_utf8(tok, tmp_path):
    p = tmp_path / "bin.jsonl"
    lines = [json.dumps(GOOD).encode()] * 3 + [b'{"instruction": "caf\xe9", "output": "x"}', json.dumps(GOOD).encode()]
    p.write_bytes(b"\n".join(lines) + b"\n")
    msg = _err(str(p), tok)
    assert msg == f"{p}:4: invalid UTF-8 (byte 0xe9 at column 21)"


def test_json_array_errors_carry_line_numbers(tok, tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"},\n  {"instruction": "d", "output": "e"}\n]\n')
    assert _err(str(p), tok) == f"{p}:3: missing field 'output'"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c" "output": "d"}\n]')
    assert _err(str(p), tok).startswith(f"{p}:4: malformed JSON")
    p.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}]')
    assert _err(str(p), tok).startswith(f"{p}:3: invalid UTF-8")
    with pytest.raises(DataError, match="no such file"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_parquet_missing_field_names_the_row(tok, tmp_path):
    import datasets

    p = str(tmp_path / "a.parquet")
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]).to_parquet(p)
    assert _err(p, tok, cache_dir=str(tmp_path / "cache")) == f"{p}:row 2: missing field 'output'"


def test_empty_and_overlength_rows_are_dropped_and_counted(tok, tmp_path, caplog):
    long = {"instruction": "Repeat", "output": "apple banana " * 80}
    rows = [GOOD, {"instruction": "x", "output": ""}, GOOD, {"instruction": "y", "output": "  \n "}, long, GOOD, GOOD]
    p = write_jsonl(tmp_path / "drop.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="megatron_ce.data"):
        train, _, stats = build_sft_dataset(p, tok, 128, packing="boundary")
    assert stats.rows_read == 7
    assert stats.dropped_empty_response == 2 and stats.dropped_overlength == 1 and stats.dropped == 3
    assert stats.train_samples == 4 == train.num_samples
    assert stats.dropped_locations == {"empty_response": [f"{p}:2", f"{p}:4"], "overlength": [f"{p}:5"]}
    warn = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "dropped 3 of 7 rows" in warn and f"{p}:5" in warn and "2 with an empty response" in warn
    assert stats.as_dict()["dropped"] == 3 and "3 dropped" in stats.summary()

    # reference packing keeps an over-length sample (split across chunks, as the reference does), counted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_ce.data"):
        train, _, stats = build_sft_dataset(p, tok, 128, packing="reference")
    assert stats.dropped_overlength == 0 and stats.overlength_split == 1 and stats.dropped_empty_response == 2
    assert "kept and split" in caplog.text

    # chat: an empty assistant turn drops the row
    u = {"role": "user", "content": "hi"}
    p = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [u, {"role": "assistant", "content": "yo"}]},
                                              {"messages": [u, {"role": "assistant", "content": " "}]}])
    _, _, stats = build_sft_dataset(p, tok, 128, fmt="chat")
    assert stats.dropped_empty_response == 1 and stats.train_samples == 1


def test_all_rows_dropped_is_an_error(tok, tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "output": ""}])
    assert _err(p, tok) == f"{p}: no usable training samples (1 of 1 rows dropped)"
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    assert _err(str(p), tok) == f"{p}: no rows"


def test_lone_surrogate_is_reported(tok, tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [GOOD, '{"instruction": "a\\ud800b", "output": "x"}'])
    assert _err(p, tok) == f"{p}:2: field 'instruction' is not valid Unicode (lone surrogate at character 1)"
    p = write_jsonl(tmp_path / "sm.jsonl", ['{"messages": [{"role": "user", "content": "\\udfff"}, '
                                            '{"role": "assistant", "content": "x"}]}'])
    assert _err(p, tok, fmt="chat") == (f"{p}:1: field 'messages[0].content' is not valid Unicode "
                                        "(lone surrogate at character 0)")
