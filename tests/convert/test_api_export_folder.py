"""The Python API's export is the CLI's: `convert_megatron_to_hf` itself ships the tokenizer recorded
with the checkpoint and generation_config.json (it used to be only tools/convert_megatron_to_hf.py), so
both write the same folder, file for file and byte for byte. Expected ids come from the tokenizer's own
files (test_export_self_contained._special_ids), not from the code under test."""

import shutil

import pytest

from megatron_ce.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from tests.convert.test_export_self_contained import TOKENIZER, _assert_self_contained, _hf_dir, _tool


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}


@pytest.mark.parametrize("recorded_by", ["converter", "trainer"])
def test_api_export_has_the_recorded_tokenizer_like_the_cli(tmp_path, recorded_by):
    """converter: the HF folder's tokenizer, kept in SAVE/hf_files/; trainer: SAVE/release/tokenizer/, where
    a training run saving into the folder records the tokenizer it trained with."""
    hf = _hf_dir(tmp_path, with_tokenizer=recorded_by == "converter")
    convert_hf_to_megatron(hf, tmp_path / "mc", moe_ce_num_compressed=2, progress=False)
    if recorded_by == "trainer":
        shutil.copytree(TOKENIZER, tmp_path / "mc" / "release" / "tokenizer")
    api = tmp_path / "api"
    convert_megatron_to_hf(tmp_path / "mc", api, progress=False)
    _assert_self_contained(api, TOKENIZER)
    cli = tmp_path / "cli"
    assert _tool("convert_megatron_to_hf").main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(cli),
                                                 "--no-progress"]) == 0
    api_files, cli_files = _files(api), _files(cli)
    assert sorted(api_files) == sorted(cli_files)
    assert [n for n in api_files if api_files[n] != cli_files[n]] == []


def test_api_tokenizer_argument_fails_before_converting(tmp_path):
    hf = _hf_dir(tmp_path)
    convert_hf_to_megatron(hf, tmp_path / "mc", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=f"--tokenizer {tmp_path / 'empty'}: no tokenizer files") as e:
        convert_megatron_to_hf(tmp_path / "mc", tmp_path / "out", tokenizer=str(tmp_path / "empty"), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
