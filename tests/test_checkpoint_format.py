"""The checkpoint format module: tracker rules and the megatron_ce.json record, against hand-written files."""

import json

import pytest

from megatron_ce import checkpoint_format as fmt


def test_tracker_names_release_or_iteration(tmp_path):
    assert fmt.read_tracker(str(tmp_path)) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert fmt.read_tracker(str(tmp_path)) == str(tmp_path / "release")
    fmt.write_tracker(str(tmp_path), 40)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "40"
    assert fmt.read_tracker(str(tmp_path)) == str(tmp_path / "iter_0000040")


def test_bad_tracker_is_one_line(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("latest")
    with pytest.raises(fmt.FormatError, match=r"latest_checkpointed_iteration.txt: expected 'release'") as e:
        fmt.read_tracker(str(tmp_path))
    assert "\n" not in str(e.value)


def test_resolve_follows_tracker_to_a_dist_checkpoint(tmp_path):
    with pytest.raises(fmt.FormatError, match="neither a dist checkpoint"):
        fmt.resolve_checkpoint_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(fmt.FormatError, match="iter_0000007, which is not a dist checkpoint"):
        fmt.resolve_checkpoint_dir(str(tmp_path))
    (tmp_path / "iter_0000007").mkdir()
    (tmp_path / "iter_0000007" / ".metadata").write_bytes(b"")
    assert fmt.resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / "iter_0000007")
    assert fmt.resolve_checkpoint_dir(str(tmp_path / "iter_0000007")) == str(tmp_path / "iter_0000007")


def test_record_round_trip_keeps_unknown_keys_and_fills_ce_defaults(tmp_path):
    written = {"model_type": "olmoe", "hf_config": {"hidden_size": 8}, "calibration": {"samples": 4}}
    (tmp_path / "megatron_ce.json").write_text(json.dumps(written))
    rec = fmt.ModelRecord.read(str(tmp_path / "megatron_ce.json"))
    assert (rec.moe_ce_num_compressed, rec.moe_ce_variant) == (0, "ia3")
    assert rec.extra == {"calibration": {"samples": 4}}
    out = tmp_path / "out"
    out.mkdir()
    rec.write(str(out))
    again = json.loads((out / "megatron_ce.json").read_text())
    assert again["calibration"] == {"samples": 4} and again["hf_config"] == {"hidden_size": 8}
    assert fmt.find_record(None, str(tmp_path / "missing"), str(out)) == str(out / "megatron_ce.json")


@pytest.mark.parametrize("text,match", [("{", r"megatron_ce.json: not a readable JSON file \(.*line 1 column"),
                                        ("[1]", "expected a JSON object, found list"),
                                        ('{"model_type": "olmoe"}', "no hf_config object")])
def test_bad_record_is_one_line(tmp_path, text, match):
    (tmp_path / "megatron_ce.json").write_text(text)
    with pytest.raises(fmt.FormatError, match=match):
        fmt.ModelRecord.read(str(tmp_path / "megatron_ce.json"))


def test_train_state_needs_iteration(tmp_path):
    assert fmt.read_train_state(str(tmp_path)) is None
    (tmp_path / "train_state.json").write_text('{"consumed_samples": 3}')
    with pytest.raises(fmt.FormatError, match="no 'iteration'"):
        fmt.read_train_state(str(tmp_path))


def test_record_without_model_type_reads(tmp_path):
    """A record naming no family (the caller then passes --model-type) is a record, not a crash."""
    (tmp_path / "megatron_ce.json").write_text('{"hf_config": {"hidden_size": 8}, "moe_ce_num_compressed": "2"}')
    rec = fmt.ModelRecord.read(str(tmp_path / "megatron_ce.json"))
    assert (rec.model_type, rec.hf_config, rec.moe_ce_num_compressed, rec.extra) == (None, {"hidden_size": 8}, 2, {})


def test_non_integer_ce_count_is_one_line(tmp_path):
    (tmp_path / "megatron_ce.json").write_text('{"model_type": "olmoe", "hf_config": {}, "moe_ce_num_compressed": "two"}')
    with pytest.raises(fmt.FormatError, match=r"megatron_ce.json: moe_ce_num_compressed must be an integer, found 'two'"):
        fmt.ModelRecord.read(str(tmp_path / "megatron_ce.json"))
