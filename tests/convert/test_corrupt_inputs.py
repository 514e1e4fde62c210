"""Corrupt or foreign inputs to the converters (issue #8): each gives one ConversionError line that
names the file and the problem, from the Python API and from the CLI tools (exit 2, one stderr line,
no traceback), before anything is written."""

import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_ce.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from tests.convert.test_convert import REPO, _tool, hf_dir  # noqa: F401  (hf_dir: fixture)

SHARD = "model-00001-of-00008.safetensors"  # hf_dir's first shard (tiny OLMoE in 40 KB shards)
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def mc_dir(hf_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("mc") / "mc"
    convert_hf_to_megatron(hf_dir, d, progress=False)
    return d


def _header_len(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _truncate(path, size) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _patch(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _write_header(path, header: bytes) -> None:
    """Replace a safetensors file's header (the data keeps its length: offsets may then be wrong)."""
    with open(path, "rb") as f:
        data = f.read()[8 + _header_len(path):]
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)


# Each case: (id, corrupt(dir) -> None, regex the message must match after "<path>: "); the path the
# message names is checked separately (`names`).
def _cut(where):
    def corrupt(d):
        p = d / SHARD
        n, size = _header_len(p), os.path.getsize(p)
        _truncate(p, {"length": 5, "empty": 0, "header": 8 + n // 2, "data": (8 + n + size) // 2, "last": size - 1}[where])

    return corrupt


HF_CASES = [
    ("cut-in-length", _cut("length"), SHARD, r"truncated \(file is 5 bytes, shorter than the 8-byte header length\)"),
    ("empty", _cut("empty"), SHARD, r"truncated \(file is 0 bytes, shorter than the 8-byte header length\)"),
    ("cut-in-header", _cut("header"), SHARD, r"truncated \(file is \d+ bytes, header declares at least \d+\)"),
    ("cut-in-data", _cut("data"), SHARD, r"truncated \(file is \d+ bytes, header declares \d+\)"),
    ("cut-last-byte", _cut("last"), SHARD, r"truncated \(file is \d+ bytes, header declares \d+\)"),
    ("garbage-file", lambda d: (d / SHARD).write_bytes(os.urandom(4096)), SHARD,
     r"not a safetensors file \(header length field reads \d+ bytes\)"),
    ("garbage-header", lambda d: _patch(d / SHARD, 8, b"\x00garbage{["), SHARD, r"not a safetensors file \(header is not JSON: .*\)"),
    ("header-not-object", lambda d: _write_header(d / SHARD, b"[1, 2, 3]"), SHARD,
     r"not a safetensors file \(header is not a JSON object\)"),
    ("bad-offsets", lambda d: _write_header(d / SHARD, b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": "x"}}'), SHARD,
     r"not a safetensors file \(tensor 'w' has no valid data_offsets\)"),
    # framing is fine but a tensor's offsets disagree with its shape: left to safetensors, wrapped
    ("shape-vs-offsets", lambda d: _write_header(d / SHARD, b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}'), SHARD,
     r"not a valid safetensors file \(.+\)"),
    ("trailing-bytes", lambda d: open(d / SHARD, "ab").write(b"extra"), SHARD, r"not a valid safetensors file \(.+\)"),
    ("missing-shard", lambda d: os.remove(d / "model-00003-of-00008.safetensors"), "",
     r"shard files listed in model.safetensors.index.json do not exist: model-00003-of-00008.safetensors"),
    ("index-not-json", lambda d: (d / INDEX).write_text('{"weight_map": {'), INDEX, r"not a readable JSON file \(.+\)"),
    ("index-no-weight-map", lambda d: (d / INDEX).write_text("[]"), INDEX, r"no weight_map of tensor name -> shard file name"),
    ("config-not-json", lambda d: (d / "config.json").write_bytes(b"\xff\xfe garbage"), "config.json", r"not a readable JSON file \(.+\)"),
    ("config-not-object", lambda d: (d / "config.json").write_text('"olmoe"'), "config.json", r"expected a JSON object, found str"),
]


def _one_error_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _check_message(msg: str, d, names: str, pattern: str) -> None:
    """`<d>/<names>: <pattern>` on one line."""
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert re.fullmatch(re.escape(str(d / names) if names else str(d)) + ": " + pattern, msg), msg


def _api_and_cli_fail_alike(src, tmp_path, capsys, convert, tool, names, pattern):
    """The API raises one ConversionError line naming the file; the CLI prints exactly it and exits 2.
    Returns the CLI's output folder (HF -> Megatron writes nothing there; Megatron -> HF may have
    written shards before a CRC failure mid-way)."""
    with pytest.raises(ConversionError) as e:
        convert(src, tmp_path / "out_api", progress=False)
    _check_message(str(e.value), src, names, pattern)
    out_dir = tmp_path / "out_cli"
    rc = _tool(tool).main(["--load-dir", str(src), "--save-dir", str(out_dir), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert _one_error_line(out.err) == f"error: {e.value}"
    return out_dir


@pytest.mark.parametrize("corrupt,names,pattern", [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_corrupt_hf_input(hf_dir, tmp_path, capsys, corrupt, names, pattern):  # noqa: F811
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    corrupt(src)
    out_dir = _api_and_cli_fail_alike(src, tmp_path, capsys, convert_hf_to_megatron, "convert_hf_to_megatron",
                                      names, pattern)
    assert not out_dir.exists()  # checked before anything is written


def _distcp(mc, i=1):
    return mc / "release" / f"__0_{i}.distcp"


def _flip_tensor_byte(mc):
    """Flip one bit inside a stored tensor's bytes (same file size): torch.load would not notice."""
    p = _distcp(mc)
    data = bytearray(p.read_bytes())
    data[len(data) - 8000] ^= 0x01  # inside the last expert tensor of layer 0, past any zip header
    p.write_bytes(bytes(data))


MC_CASES = [
    ("missing-distcp", lambda d: os.remove(_distcp(d)), "release/__0_1.distcp", r"missing \(listed in .*/release/\.metadata\)"),
    ("missing-metadata", lambda d: os.remove(d / "release" / ".metadata"), "latest_checkpointed_iteration.txt",
     r"points to .*/release, which is not a dist checkpoint \(no \.metadata\)"),
    ("truncated-distcp", lambda d: _truncate(_distcp(d), 5000), "release/__0_1.distcp",
     r"truncated \(file is 5000 bytes, \.metadata declares \d+\)"),
    ("flipped-bit-distcp", _flip_tensor_byte, "release/__0_1.distcp", r"corrupt data at byte \d+ \(CRC-32 mismatch in archive/data/0\)"),
    ("garbage-distcp", lambda d: _distcp(d).write_bytes(os.urandom(os.path.getsize(_distcp(d)))), "release/__0_1.distcp",
     r"corrupt data at byte 0 \(.+\)"),
    ("truncated-metadata", lambda d: _truncate(d / "release" / ".metadata", 100), "release/.metadata",
     r"not a readable DCP metadata file \(.+\)"),
    ("garbage-metadata", lambda d: (d / "release" / ".metadata").write_bytes(b"not a pickle"), "release/.metadata",
     r"not a readable DCP metadata file \(.+\)"),
    ("foreign-metadata", lambda d: (d / "release" / ".metadata").write_bytes(pickle.dumps(SimpleNamespace(a=1))),
     "release/.metadata", r"not a DCP metadata file \(holds SimpleNamespace\)"),
    ("meta-json-not-json", lambda d: (d / "release" / "megatron_ce.json").write_text("{"), "release/megatron_ce.json",
     r"not a readable JSON file \(.+\)"),
    ("meta-json-foreign", lambda d: (d / "release" / "megatron_ce.json").write_text('{"model_type": "olmoe"}'),
     "release/megatron_ce.json", r"no hf_config object \(not written by convert_hf_to_megatron\?\)"),
    ("tracker-garbage", lambda d: (d / "latest_checkpointed_iteration.txt").write_text("latest\n"),
     "latest_checkpointed_iteration.txt", r"expected 'release' or an iteration number, found 'latest'"),
]


@pytest.mark.parametrize("corrupt,names,pattern", [c[1:] for c in MC_CASES], ids=[c[0] for c in MC_CASES])
def test_corrupt_megatron_input(mc_dir, tmp_path, capsys, corrupt, names, pattern):
    src = tmp_path / "mc"
    shutil.copytree(mc_dir, src)
    corrupt(src)
    _api_and_cli_fail_alike(src, tmp_path, capsys, convert_megatron_to_hf, "convert_megatron_to_hf", names, pattern)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("side", ["hf", "megatron"])
def test_cli_process_prints_one_line(hf_dir, mc_dir, tmp_path, side):  # noqa: F811
    """The real process: exit 2, exactly one line on stderr (no traceback, no import warnings)."""
    src = tmp_path / "src"
    if side == "hf":
        shutil.copytree(hf_dir, src)
        _cut("data")(src)
        tool, bad = "convert_hf_to_megatron", src / SHARD
    else:
        shutil.copytree(mc_dir, src)
        _truncate(_distcp(src), 5000)
        tool, bad = "convert_megatron_to_hf", _distcp(src)
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", tool + ".py"), "--load-dir", str(src), "--save-dir",
         str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=110, cwd=REPO,
    )
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(f"error: {re.escape(str(bad))}: truncated \\(file is \\d+ bytes, [^\n]*\\)\n", r.stderr), r.stderr
