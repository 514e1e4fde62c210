"""HF checkpoint I/O: safetensors only (no pickle), one tensor at a time.

Reading: a directory with `model.safetensors.index.json` + shards, or a single `model.safetensors` (or
any `*.safetensors` files). Tensors are read lazily through `safe_open` (memory-mapped; only the
requested tensor, or the requested slice of it, is copied out).

Expert layout: checkpoints on disk (what transformers 4.x and 5.x `save_pretrained` write) keep one
tensor per expert, `...mlp.experts.E.{gate,up,down}_proj.weight`; transformers 5.x fuses them on load
into `experts.gate_up_proj` [E, 2F, d] and `experts.down_proj` [E, d, F]. A family's `FusedExperts`
rule lets the reader present fused tensors found on disk under the per-expert names (slicing one
expert out of the fused tensor), so the mapping tables only know the per-expert layout. Writing always
produces the per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_ce.convert.mapping import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The safetensors library refuses larger headers; a larger length means the file is not safetensors.
MAX_HEADER_BYTES = 100_000_000

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class FusedExperts:
    """A fused 3-D expert tensor on disk -> per-expert tensors.

    fused: regex of the fused tensor name; its groups fill `per_expert` (with `{expert}` added).
    parts: (per-expert name template, part index, number of parts): expert e's tensor is
        fused[e] split into `n` equal chunks along dim 0, chunk `i`.
    """

    fused: str
    parts: Sequence[Tuple[str, int, int]]

    def expand(self, name: str, shape: Sequence[int]) -> Optional[Dict[str, Tuple[int, int, int]]]:
        m = re.fullmatch(self.fused, name)
        if m is None:
            return None
        out = {}
        for e in range(shape[0]):
            for template, i, n in self.parts:
                out[template.format(*m.groups(), expert=e)] = (e, i, n)
        return out


@dataclass
class _Entry:
    file: str
    name: str  # name in the file
    shape: Tuple[int, ...]
    dtype: torch.dtype
    part: Optional[Tuple[int, int, int]] = None  # (expert, chunk index, chunks) of a fused tensor


class HFCheckpointReader:
    """Lazy, name-normalised view of the safetensors weights of an HF model directory."""

    def __init__(self, model_dir: str, fused: Sequence[FusedExperts] = (), aliases: Sequence[Tuple[str, str]] = ()):
        self.model_dir = os.fspath(model_dir)
        self.files = self._weight_files(self.model_dir)
        self._handles: Dict[str, object] = {}
        self.entries: Dict[str, _Entry] = {}
        self.fused_names: List[str] = []
        from safetensors import SafetensorError, safe_open

        for fname in self.files:
            path = os.path.join(self.model_dir, fname)
            # Our own check first: it names the file and the problem (safetensors' errors name neither),
            # and it catches truncation before any tensor is read.
            check_safetensors(path)
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        shape = tuple(sl.get_shape())
                        dtype = _ST_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                        self._add(name, _Entry(fname, name, shape, dtype), fused, aliases)
            except SafetensorError as e:  # what check_safetensors does not look at (e.g. offsets vs shapes)
                raise ConversionError(f"{path}: not a valid safetensors file ({one_line(e)})") from e

    @staticmethod
    def _weight_files(model_dir: str) -> List[str]:
        if not os.path.isdir(model_dir):
            raise ConversionError(f"HF model directory {model_dir} does not exist")
        index = os.path.join(model_dir, INDEX_NAME)
        if os.path.isfile(index):
            content = read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: no weight_map of tensor name -> shard file name")
            files = sorted(set(weight_map.values()))
            missing = [x for x in files if not os.path.isfile(os.path.join(model_dir, x))]
            if missing:
                raise ConversionError(f"{model_dir}: shard files listed in {INDEX_NAME} do not exist: {', '.join(missing)}")
            return files
        if os.path.isfile(os.path.join(model_dir, SINGLE_NAME)):
            return [SINGLE_NAME]
        files = sorted(x for x in os.listdir(model_dir) if x.endswith(".safetensors"))
        if files:
            return files
        pickles = sorted(x for x in os.listdir(model_dir) if x.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles:
            raise ConversionError(
                f"{model_dir} holds only pickle weights ({', '.join(pickles)}); only safetensors are read "
                "(pickle can run code). Re-save the model with safetensors from a trusted environment."
            )
        raise ConversionError(f"no safetensors weights in {model_dir}")

    def _add(self, name, entry, fused, aliases):
        for pattern, repl in aliases:
            name = re.sub(pattern, repl, name)
        for rule in fused:
            parts = rule.expand(name, entry.shape)
            if parts is not None:
                self.fused_names.append(name)
                for per_name, part in parts.items():
                    e, i, n = part
                    shape = (entry.shape[1] // n, *entry.shape[2:])
                    self._put(per_name, _Entry(entry.file, entry.name, shape, entry.dtype, part))
                return
        self._put(name, entry)

    def _put(self, name, entry):
        if name in self.entries:
            raise ConversionError(f"tensor {name} appears twice in {self.model_dir} (fused and per-expert?)")
        self.entries[name] = entry

    def keys(self) -> List[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            from safetensors import safe_open

            h = safe_open(os.path.join(self.model_dir, fname), framework="pt")
            self._handles[fname] = h
        return h

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        h = self._handle(entry.file)
        if entry.part is None:
            return h.get_tensor(entry.name)
        e, i, n = entry.part
        rows = entry.shape[0]
        return h.get_slice(entry.name)[e, i * rows : (i + 1) * rows].contiguous()

    def release(self) -> None:
        """Close the memory maps (their touched pages stop counting as resident)."""
        self._handles.clear()


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the CLI prints errors as a single line)."""
    return " ".join(str(e).split()) or type(e).__name__


def read_json(path: str):
    """A JSON file's content; unreadable or invalid JSON -> ConversionError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({one_line(e)})") from e


def check_safetensors(path: str) -> None:
    """Check a safetensors file's framing without reading tensors: 8-byte little-endian header length,
    a JSON header of that length, and data at least as long as the largest `data_offsets` end.
    Raises a one-line ConversionError naming the file and the problem."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            raw = f.read(n) if len(head) == 8 and 8 + n <= size and n <= MAX_HEADER_BYTES else b""
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({one_line(e)})") from e
    if size < 8:
        raise ConversionError(f"{path}: truncated (file is {size} bytes, shorter than the 8-byte header length)")
    if n > MAX_HEADER_BYTES:
        raise ConversionError(f"{path}: not a safetensors file (header length field reads {n} bytes)")
    if 8 + n > size:
        raise ConversionError(f"{path}: truncated (file is {size} bytes, header declares at least {8 + n})")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {one_line(e)})") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int and x >= 0 for x in offsets)):
            raise ConversionError(f"{path}: not a safetensors file (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated (file is {size} bytes, header declares {8 + n + end})")


def parse_size(size) -> int:
    """'2GB' / '500MB' / '10KB' / int bytes -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 2GB, 500MB)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


_DTYPE_ST = {v: k for k, v in _ST_DTYPES.items()}


class ShardedSafetensorsWriter:
    """Writes a planned set of tensors into safetensors shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own), named like transformers' `save_pretrained`
    (`model.safetensors` if one shard, else `model-0000i-of-0000N.safetensors` + index).

    The names, shapes and dtypes are known in advance, so each shard's header is written first and
    every tensor is written to its place as soon as it is added: nothing is buffered (safetensors'
    own `save_file` needs all tensors of a shard in memory, plus a bytes copy of them).
    """

    def __init__(self, save_dir: str, plan: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int = 2 * 10**9):
        self.save_dir = os.fspath(save_dir)
        os.makedirs(self.save_dir, exist_ok=True)
        shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            if dtype not in _DTYPE_ST:
                raise ConversionError(f"{name}: dtype {dtype} cannot be written to safetensors")
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(int(x) for x in shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: Dict[str, Tuple[int, int, Tuple[int, ...], torch.dtype]] = {}  # name -> shard, offset
        self._left: List[int] = []
        self._headers: List[bytes] = []
        self.total_size = 0
        for i, shard in enumerate(shards):
            header, offset = {}, 0
            for name, shape, dtype, nbytes in shard:
                if name in self._where:
                    raise ConversionError(f"tensor {name} planned twice")
                header[name] = {"dtype": _DTYPE_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self._where[name] = (i, offset, shape, dtype)
                offset += nbytes
            self.total_size += offset
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._headers.append(len(raw).to_bytes(8, "little") + raw)
            self._left.append(len(shard))
        self._open: Dict[int, object] = {}
        self._written = set()

    def _file(self, i: int):
        f = self._open.get(i)
        if f is None:
            f = open(os.path.join(self.save_dir, self.files[i]), "wb")
            f.write(self._headers[i])
            self._open[i] = f
        return f

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise ConversionError(f"tensor {name} was not planned")
        if name in self._written:
            raise ConversionError(f"tensor {name} written twice")
        i, offset, shape, dtype = self._where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(
                f"{name}: got {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}"
            )
        f = self._file(i)
        f.seek(len(self._headers[i]) + offset)
        t = tensor.detach().contiguous().cpu()
        f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        self._written.add(name)
        self._left[i] -= 1
        if self._left[i] == 0:
            f.close()
            del self._open[i]

    def close(self) -> List[str]:
        """Check everything was written; write the index (several shards). Returns the file names."""
        missing = [n for n in self._where if n not in self._written]
        for f in self._open.values():
            f.close()
        self._open.clear()
        if missing:
            raise ConversionError(f"{len(missing)} planned tensors were not written: {missing[:10]}")
        index = os.path.join(self.save_dir, INDEX_NAME)
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for name, (i, *_rest) in self._where.items()}
            with open(index, "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        elif os.path.exists(index):
            os.remove(index)
        return list(self.files)
