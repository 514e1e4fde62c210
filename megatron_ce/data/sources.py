"""Reading SFT rows: local JSONL / JSON / parquet files (or a folder of them), a Hugging Face hub
dataset name, or an in-memory `datasets.Dataset`, plus the `--task` presets of the paper.

Every row comes back with a *location* string used in error messages:
``path:LINE`` for JSON Lines and JSON files (the 1-based line the row starts on), ``path:row N``
for parquet files and hub datasets (1-based row number). Bad data raises :class:`DataError`, whose
message is a single line ``location: reason``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterator, Optional, Sequence, Union

__all__ = [
    "DataError",
    "TaskPreset",
    "TASK_PRESETS",
    "iter_rows",
    "read_rows",
]


class DataError(ValueError):
    """Bad input data. ``str(err)`` is one line: ``location: reason``."""

    def __init__(self, location: str, reason: str):
        reason = " ".join(str(reason).split())  # one line, whatever the underlying message was
        self.location = location
        self.reason = reason
        super().__init__(f"{location}: {reason}")


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """Where a ``--task`` gets its data and how its rows are laid out."""

    hub_name: str
    prompt_field: Optional[str] = None  # alpaca-style layout: instruction column
    response_field: Optional[str] = None  # alpaca-style layout: response column
    messages_field: Optional[str] = None  # chat layout: list of {"role", "content"}
    first_turn_only: bool = False  # use only the first user/assistant pair of `messages`


# docs/METHOD.md §4: the datasets of the paper's SFT runs and their field layouts.
TASK_PRESETS = {
    "math": TaskPreset("TIGER-Lab/MathInstruct", prompt_field="instruction", response_field="output"),
    "coding": TaskPreset("ise-uiuc/Magicoder-Evol-Instruct-110K", prompt_field="instruction",
                         response_field="response"),
    "general": TaskPreset("allenai/tulu-3-sft-mixture", messages_field="messages", first_turn_only=True),
}

_LOCAL_EXTS = (".jsonl", ".json", ".parquet")

Row = tuple  # (location: str, row: Any)


# ----------------------------------------------------------------------------------------------
# JSON Lines / JSON


def _decode_utf8(data: bytes, path: str, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}",
                        f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None


def _iter_jsonl(path: str) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            text = _decode_utf8(raw, path, lineno)
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"malformed JSON: {e.msg} (column {e.colno})") from None
            yield f"{path}:{lineno}", row


def _iter_json(path: str) -> Iterator[Row]:
    """A JSON file: an array of objects (each row located by the line it starts on), or JSON Lines
    under a .json name (as the `datasets` json loader also accepts)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.lstrip().startswith(b"["):
        yield from _iter_jsonl(path)
        return
    text = _decode_utf8(data, path)
    dec = json.JSONDecoder()
    n = len(text)
    line, line_pos = 1, 0  # incremental line counting: line of position `line_pos`

    def line_of(pos):
        nonlocal line, line_pos
        line += text.count("\n", line_pos, pos)
        line_pos = pos
        return line

    def skip_ws(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def bad(pos, msg):
        return DataError(f"{path}:{line_of(pos)}", f"malformed JSON: {msg}")

    i = skip_ws(0) + 1  # past '['
    i = skip_ws(i)
    if i < n and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                row, j = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg} (column {e.colno})") from None
            yield f"{path}:{line_of(i)}", row
            i = skip_ws(j)
            if i < n and text[i] == ",":
                i = skip_ws(i + 1)
                continue
            if i < n and text[i] == "]":
                i += 1
                break
            raise bad(min(i, n), "expected ',' or ']' after an array element")
    i = skip_ws(i)
    if i != n:
        raise bad(i, "extra data after the top-level array")


# ----------------------------------------------------------------------------------------------
# parquet / hub / datasets.Dataset (all through `datasets`)


def _iter_hf_dataset(ds, label: str) -> Iterator[Row]:
    for k, row in enumerate(ds, start=1):
        yield f"{label}:row {k}", row


def _iter_parquet(path: str, cache_dir: Optional[str]) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(path, cache_dir=cache_dir)
    except Exception as e:  # pyarrow / datasets errors on a corrupt file
        raise DataError(path, f"cannot read parquet file ({type(e).__name__}: {e})") from None
    yield from _iter_hf_dataset(ds, path)


def _iter_hub(name: str, split: str, cache_dir: Optional[str], config: Optional[str]) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(name, f"cannot load split '{split}' from the Hugging Face hub ({type(e).__name__}: {e}); "
                              "without network access pass a local JSONL/JSON/parquet file") from None
    yield from _iter_hf_dataset(ds, name)


# ----------------------------------------------------------------------------------------------


def _local_files(path: str) -> list:
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if p.lower().endswith(_LOCAL_EXTS) and os.path.isfile(p))
        if not files:
            raise DataError(path, f"folder holds no {'/'.join(_LOCAL_EXTS)} files")
        return files
    return [path]


def _looks_like_hub_name(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.lower().endswith(_LOCAL_EXTS) and not s.startswith((".", "~"))


def iter_rows(source: Union[str, os.PathLike, Sequence, Any], split: str = "train",
              cache_dir: Optional[str] = None, hub_config: Optional[str] = None) -> Iterator[Row]:
    """Yield ``(location, row)`` for every row of `source`.

    `source`: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder of them (read in sorted
    order), a list of such paths, a hub dataset name ``owner/name`` (loaded with
    ``datasets.load_dataset(name, hub_config, split=split)``), or a ``datasets.Dataset``.
    """
    if isinstance(source, (list, tuple)):
        for s in source:
            yield from iter_rows(s, split, cache_dir, hub_config)
        return
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # datasets.Dataset
            info = getattr(source, "info", None)
            yield from _iter_hf_dataset(source, getattr(info, "dataset_name", None) or "dataset")
            return
        raise TypeError(f"unsupported data source {type(source).__name__}")
    source = os.fspath(source)
    if os.path.exists(source):
        for path in _local_files(source):
            low = path.lower()
            if low.endswith(".parquet"):
                yield from _iter_parquet(path, cache_dir)
            elif low.endswith(".json"):
                yield from _iter_json(path)
            else:  # .jsonl and anything else: JSON Lines
                yield from _iter_jsonl(path)
        return
    if _looks_like_hub_name(source):
        yield from _iter_hub(source, split, cache_dir, hub_config)
        return
    raise DataError(source, "no such file or folder (and not a hub dataset name 'owner/name')")


def read_rows(source, split: str = "train", cache_dir: Optional[str] = None,
              hub_config: Optional[str] = None) -> list:
    """``list(iter_rows(...))``."""
    return list(iter_rows(source, split, cache_dir, hub_config))
