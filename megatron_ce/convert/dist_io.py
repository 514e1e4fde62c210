"""megatron-core dist checkpoints (torch_dist format) written and read one layer at a time.

A megatron-core dist checkpoint stores every parameter as a *global* tensor under its sharded key
(e.g. `decoder.layers.self_attention.linear_qkv.weight` of shape [num_layers, 3d, d], experts as
[num_layers, num_experts, ...]), which is why one checkpoint loads at any TP/EP/PP layout. The keys,
global shapes and per-parameter offsets are taken from megatron-core itself: `model_layout()` reads
`sharded_state_dict()` of the model built at TP=PP=EP=1 on the meta device (no memory), with its
factories applied (e.g. the SwiGLU fc1 split into gate/up chunks, exactly as mcore saves it).

Writing uses torch.distributed.checkpoint (DCP) with a planner that produces the tensor of each chunk
only when the storage writer asks for it (`resolve_data`), and a storage writer that puts each layer
in its own file: DCP keeps every tensor of a file alive until the file is closed, so a file per layer
bounds memory to about one layer. Reading uses DCP with a planner that asks for arbitrary regions of
the global tensors (one parameter of one layer), so a checkpoint saved at any layout is read the same
way. Besides the tensors we write what `dist_checkpointing.save` writes: `metadata.json`,
`common.pt` (an empty common state) and the ShardedObjects (module `_extra_state`) of the model.

Before reading, every data file `.metadata` names is checked to exist and be long enough, and each
chunk's zip CRC-32s are checked (torch.load does not): a missing, truncated or bit-flipped file is a
one-line ConversionError naming it, never a different weight.

Note: DCP's own `.metadata` file is a pickle (torch's format): read megatron checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ce.convert.hf_io import one_line
from megatron_ce.convert.mapping import ConversionError

METADATA_JSON = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass
class Chunk:
    key: str
    global_shape: Tuple[int, ...]
    global_offset: Tuple[int, ...]  # includes prepended (layer / expert) axes
    local_shape: Tuple[int, ...]  # without prepended axes
    prepend: int

    @property
    def sizes(self) -> Tuple[int, ...]:
        return (1,) * self.prepend + tuple(self.local_shape)

    def param_region(self) -> Tuple[slice, ...]:
        """Where this chunk lies in its (world-1, full) parameter."""
        return tuple(
            slice(o, o + s) for o, s in zip(self.global_offset[self.prepend :], self.local_shape)
        )


@dataclass
class ParamLayout:
    """Where one parameter of the TP=PP=EP=1 model lives in the dist checkpoint."""

    name: str  # state-dict name, e.g. decoder.layers.3.mlp.router.weight
    shape: Tuple[int, ...]
    chunks: List[Chunk]

    @property
    def key(self) -> str:
        return self.chunks[0].key

    @property
    def global_shape(self) -> Tuple[int, ...]:
        return self.chunks[0].global_shape

    @property
    def base_offset(self) -> Tuple[int, ...]:
        c = self.chunks[0]
        return tuple(c.global_offset[: c.prepend]) + (0,) * len(self.shape)

    @property
    def region_sizes(self) -> Tuple[int, ...]:
        return (1,) * self.chunks[0].prepend + tuple(self.shape)


@dataclass
class ModelLayout:
    params: "OrderedDict[str, ParamLayout]"
    objects: List[Tuple[str, object]]  # (unique key, data) of ShardedObjects

    def keys(self) -> Dict[str, Tuple[int, ...]]:
        """Global tensor keys -> global shapes."""
        out: Dict[str, Tuple[int, ...]] = {}
        for p in self.params.values():
            out.setdefault(p.key, p.global_shape)
        return out

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """mcore parameter names -> their full (world-1) shapes."""
        return {n: p.shape for n, p in self.params.items()}

    def rename_keys(self, renames: Dict[str, str]) -> None:
        """Read (or write) the parameters stored under key k from key renames[k] instead."""
        for p in self.params.values():
            for ch in p.chunks:
                ch.key = renames.get(ch.key, ch.key)


def model_layout(model: torch.nn.Module) -> ModelLayout:
    """ModelLayout of a model built at TP=PP=EP=1 (on any device, meta included)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items() if torch.is_tensor(t)}
    params: "OrderedDict[str, ParamLayout]" = OrderedDict()
    objects: List[Tuple[str, object]] = []

    def leaves(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from leaves(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from leaves(x)
        else:
            yield v

    for name, v in sd.items():
        for leaf in leaves(v):
            if isinstance(leaf, ShardedTensor):
                if leaf.flattened_range is not None:
                    raise ConversionError(f"{name}: flattened sharded tensors are not supported")
                if name not in shapes:
                    raise ConversionError(f"{name}: sharded tensor without a state-dict tensor")
                chunk = Chunk(
                    leaf.key,
                    tuple(leaf.global_shape),
                    tuple(leaf.global_offset),
                    tuple(leaf.local_shape),
                    leaf.prepend_axis_num,
                )
                if name not in params:
                    params[name] = ParamLayout(name, shapes[name], [])
                params[name].chunks.append(chunk)
            elif isinstance(leaf, ShardedObject):
                objects.append((leaf.unique_key, leaf.data))
            # LocalNonpersistentObject and plain values: not stored
    return ModelLayout(params, objects)


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs in one process (which is the intent) and about ShardedTensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor")
        yield


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP save planner whose plan is given (no state dict) and whose data is produced on demand."""

    def __init__(self, items, resolve):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = list(items)
        self._resolve = resolve

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self):
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item):
        return self._resolve(write_item)


class _GroupedFileWriter(FileSystemWriter):
    """FileSystemWriter writing one file per group of items instead of one file per rank: DCP holds
    every tensor of a file until the file is closed, so a file per layer bounds memory to a layer."""

    def __init__(self, path, group_of: Callable):
        super().__init__(path, single_file_per_rank=True, sync_files=False, thread_count=1, overwrite=True)
        self._group_of = group_of

    def write_data(self, plan, planner):
        groups: "OrderedDict[str, list]" = OrderedDict()
        for item in plan.items:
            groups.setdefault(self._group_of(item.index.fqn, item), []).append(item)
        file_queue: queue.Queue = queue.Queue()
        for i, items in enumerate(groups.values()):
            file_name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
            file_queue.put((self.fs.concat_path(self.path, file_name), file_name, items))
        return self._write_data(planner, file_queue)


def _read_items(requests, tensors_md):
    """DCP read items of regions [(key, offsets, sizes)] of global tensors."""
    items = []
    for key, offsets, sizes in requests:
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items += create_read_items_for_chunk_list(key, tensors_md[key], [chunk])
    return items


class _RegionLoadPlanner(DefaultLoadPlanner):
    """DCP load planner reading given regions of global tensors into given buffers."""

    def __init__(self, requests, tensors_md, bufs):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._requests = requests
        self._tensors_md = tensors_md
        self._bufs = bufs

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.state_dict = {}
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self):
        return LoadPlan(_read_items(self._requests, self._tensors_md))

    def resolve_tensor(self, read_item):
        view = self._bufs[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, o, n)
        return view

    def commit_tensor(self, read_item, tensor):
        pass


def write_dist_checkpoint(
    ckpt_dir: str,
    layout: ModelLayout,
    key_dtypes: Dict[str, torch.dtype],
    produce: Callable[[str], torch.Tensor],
    group_of_param: Callable[[str], str],
    on_group_done: Optional[Callable[[str], None]] = None,
) -> None:
    """Write a torch_dist checkpoint of `layout`, asking `produce(param_name)` for each parameter's
    full (world-1) tensor when its chunks are written; parameters are written in layout order, one
    file per group. `produce` may cache; `on_group_done(group)` is called after each group."""
    os.makedirs(ckpt_dir, exist_ok=True)
    items, source, fqn_group = _tensor_items(layout, key_dtypes, group_of_param)
    object_items, object_data = _object_items(layout)

    def resolve(write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = object_data[write_item.index.fqn]
            buf.seek(0)
            return buf
        name, ch = source[(write_item.index.fqn, tuple(write_item.index.offset))]
        return produce(name)[ch.param_region()].to(key_dtypes[ch.key]).reshape(ch.sizes).contiguous()

    def group_of(fqn, item):
        if item.type == WriteItemType.BYTE_IO:
            return "__objects__"
        return fqn_group[(fqn, tuple(item.index.offset))]

    planner = _StreamingSavePlanner(items + object_items, _tracking(resolve, fqn_group, on_group_done))
    writer = _GroupedFileWriter(ckpt_dir, group_of)
    with _quiet_dcp():
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    if on_group_done:
        on_group_done(None)  # flush the last group
    with open(os.path.join(ckpt_dir, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(METADATA_JSON, f)
    torch.save({}, os.path.join(ckpt_dir, "common.pt"))


def _tensor_items(layout: ModelLayout, key_dtypes, group_of_param):
    """One DCP write item per stored chunk, with where its data comes from ((key, offset) -> (param
    name, chunk)) and the group (file) it goes to ((key, offset) -> group)."""
    items, source, fqn_group = [], {}, {}
    for p in layout.params.values():
        group = group_of_param(p.name)
        for ch in p.chunks:
            offsets = torch.Size(ch.global_offset)
            items.append(WriteItem(
                index=MetadataIndex(fqn=ch.key, offset=offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(ch.sizes)),
                    properties=TensorProperties(dtype=key_dtypes[ch.key]),
                    size=torch.Size(ch.global_shape),
                ),
            ))
            source[(ch.key, tuple(ch.global_offset))] = (p.name, ch)
            fqn_group[(ch.key, tuple(ch.global_offset))] = group
    return items, source, fqn_group


def _object_items(layout: ModelLayout):
    """The model's ShardedObjects as DCP byte items, serialised as megatron-core stores them."""
    items, data = [], {}
    for key, obj in layout.objects:
        items.append(WriteItem(index=MetadataIndex(fqn=key), type=WriteItemType.BYTE_IO))
        buf = io.BytesIO()
        torch.save([obj], buf)  # what megatron-core stores for a ShardedObject
        data[key] = buf
    return items, data


def _tracking(resolve, fqn_group, on_group_done):
    """Wrap resolve so that on_group_done(previous group) runs when the writer moves to a new group."""
    state = {"group": None}

    def wrapped(write_item):
        if write_item.type != WriteItemType.BYTE_IO and on_group_done is not None:
            g = fqn_group[(write_item.index.fqn, tuple(write_item.index.offset))]
            if state["group"] is not None and g != state["group"]:
                on_group_done(state["group"])
            state["group"] = g
        return resolve(write_item)

    return wrapped


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


class DistCheckpointReader:
    """Regions of the global tensors of a torch_dist checkpoint."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = os.fspath(ckpt_dir)
        path = os.path.join(self.ckpt_dir, ".metadata")
        if not os.path.isfile(path):
            raise ConversionError(f"{self.ckpt_dir} is not a torch_dist checkpoint (no .metadata)")
        try:
            self.metadata = FileSystemReader(self.ckpt_dir).read_metadata()
        except Exception as e:  # unpickling a damaged or foreign file can raise almost any error type
            raise ConversionError(f"{path}: not a readable DCP metadata file ({type(e).__name__}: {one_line(e)})") from e
        if not isinstance(self.metadata, Metadata) or not isinstance(self.metadata.storage_data, dict):
            raise ConversionError(f"{path}: not a DCP metadata file (holds {type(self.metadata).__name__})")
        self.tensors = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._check_files()
        self._verified = set()  # storage indices whose checksums were checked

    def _check_files(self) -> None:
        """Every data file .metadata names must exist and reach the end of its last item: a missing or
        truncated file is reported by name here, before any tensor is read (DCP would fail mid-way)."""
        ends: Dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
        for rel, end in sorted(ends.items()):
            path = os.path.join(self.ckpt_dir, rel)
            if not os.path.isfile(path):
                raise ConversionError(f"{path}: missing (listed in {os.path.join(self.ckpt_dir, '.metadata')})")
            size = os.path.getsize(path)
            if size < end:
                raise ConversionError(f"{path}: truncated (file is {size} bytes, .metadata declares {end})")

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, requests: Sequence[Tuple[str, Sequence[int], Sequence[int]]]) -> List[torch.Tensor]:
        """[(key, offsets, sizes)] -> tensors of those regions (checkpoint dtype)."""
        bufs: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
        out = []
        for key, offsets, sizes in requests:
            if key not in self.tensors:
                raise ConversionError(f"{key} is not in the checkpoint {self.ckpt_dir}")
            t = torch.empty(tuple(sizes), dtype=self.dtype(key))
            bufs[(key, tuple(offsets))] = t
            out.append(t)
        storage = {i.storage_index: self.metadata.storage_data[i.storage_index] for i in _read_items(requests, self.tensors)}
        for index, info in storage.items():
            if index not in self._verified:
                _verify_chunk(os.path.join(self.ckpt_dir, info.relative_path), info)
                self._verified.add(index)
        planner = _RegionLoadPlanner(list(requests), self.tensors, bufs)
        try:
            with _quiet_dcp():
                dcp.load({}, storage_reader=FileSystemReader(self.ckpt_dir), planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:  # sizes and checksums were checked: what is left?
            files = ", ".join(sorted({os.path.join(self.ckpt_dir, i.relative_path) for i in storage.values()}))
            raise ConversionError(f"{files}: cannot read ({_first_error_line(e)})") from e
        bufs.clear()  # the caller owns the tensors now (no reference left in DCP objects)
        return out


def _verify_chunk(path: str, info) -> None:
    """Check one stored chunk's CRC-32s. DCP stores each tensor chunk as a torch.save zip whose members
    carry CRC-32s, but torch.load does not check them: a flipped bit would load as a different weight.
    Chunks written through a storage transform (compression, ...) are not plain zips and are skipped, as
    are zips written with torch's compute_crc32 off (every CRC field 0)."""
    if getattr(info, "transform_descriptors", None):
        return
    with open(path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            if all(m.CRC == 0 for m in z.infolist()):
                return
            bad = z.testzip()
    except Exception as e:  # zipfile raises several types on garbage (BadZipFile, struct.error, ...)
        raise ConversionError(f"{path}: corrupt data at byte {info.offset} ({type(e).__name__}: {one_line(e)})") from e
    if bad is not None:
        raise ConversionError(f"{path}: corrupt data at byte {info.offset} (CRC-32 mismatch in {bad})")


def _first_error_line(e: BaseException) -> str:
    """The root cause of a DCP failure on one line. DCP wraps a rank's error in a CheckpointException
    (a BaseException) whose message is a traceback; the original error is in `failures` (rank -> (error,
    stack))."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {one_line(e)}"[:300]
