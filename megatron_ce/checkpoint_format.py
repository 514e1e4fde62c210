"""What a megatron-ce checkpoint folder holds, defined once for the trainer and the converters.

    SAVE/latest_checkpointed_iteration.txt   "release" (converted) or "40" (trained); written last, atomically
    SAVE/release/ or SAVE/iter_0000040/      megatron-core torch_dist checkpoint (.metadata, *.distcp)
        megatron_ce.json                     `ModelRecord`: family, HF config, CE settings, provenance
        train_state.json                     trained checkpoints only: iteration, data position, LR schedule
        rank_NNNNN.pt                        trained checkpoints only: each rank's exact optimizer state + RNG
        optimizer/                           trained checkpoints only (plain optimizer): the optimizer state as
                                             a torch_dist checkpoint of its own, loadable under another layout
        tokenizer/                           the tokenizer trained with (trainer saves)
    SAVE/megatron_ce.json                    a copy of the record at the root, for tools that look there
    SAVE/hf_files/                           tokenizer / generation config of the HF source (converter)

The rules for finding and verifying these live here; the trainer (training/checkpoint.py) owns the
atomic save protocol and the converters (convert/hf_to_megatron.py, convert/megatron_to_hf.py) the
tensor streams. docs/ARCHITECTURE.md describes both flows.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

TRACKER = "latest_checkpointed_iteration.txt"
STATE = "train_state.json"
META_NAME = "megatron_ce.json"
RELEASE = "release"
HF_FILES_DIR = "hf_files"
TOKENIZER_DIR = "tokenizer"
OPTIMIZER_DIR = "optimizer"  # training/optim_reshard.py: reshardable optimizer state
DIST_FORMAT = "megatron-core torch_dist"


class FormatError(ValueError):
    """A checkpoint folder or record that does not follow this format (one line, naming the file)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the converters' CLIs print errors as a single line)."""
    return " ".join(str(e).split()) or type(e).__name__


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def fsync_path(path: str) -> None:
    """Make a rename or a new file durable (the folder entry as well as the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write `path` so that a crash leaves either the old or the new content, never a mix."""
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def read_tracker(root: str) -> Optional[str]:
    """The checkpoint folder the tracker file names, without checking that folder; None when there
    is no tracker file. Content other than 'release' or an iteration number is a FormatError."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            it = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read ({one_line(e)})") from None
    if it == RELEASE:
        return os.path.join(root, RELEASE)
    if it.isdigit():
        return iter_dir(root, int(it))
    raise FormatError(f"{path}: expected '{RELEASE}' or an iteration number, found {it[:40]!r}")


def write_tracker(root: str, name) -> None:
    """Point the tracker at `name` ('release' or an iteration number), atomically."""
    atomic_write(os.path.join(root, TRACKER), str(name).encode())


def is_dist_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def resolve_checkpoint_dir(load_dir: str) -> str:
    """The dist checkpoint folder of a save folder (through its tracker) or the folder itself."""
    load_dir = os.fspath(load_dir)
    if is_dist_checkpoint(load_dir):
        return load_dir
    path = read_tracker(load_dir)
    if path is None:
        raise FormatError(f"{load_dir} is neither a dist checkpoint (.metadata) nor a save dir ({TRACKER})")
    if not is_dist_checkpoint(path):
        raise FormatError(f"{os.path.join(load_dir, TRACKER)}: points to {path}, which is not a dist "
                          "checkpoint (no .metadata)")
    return path


def read_json_object(path: str) -> Dict[str, Any]:
    """A JSON file holding an object; anything else is a FormatError naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # the JSON error names line and column
        raise FormatError(f"{path}: not a readable JSON file ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


@dataclass
class ModelRecord:
    """megatron_ce.json: which model the weights belong to. The CE fields' defaults are the trainer's
    (CETransformerConfig): a record without them describes a model without compressed experts."""

    model_type: Optional[str]
    hf_config: Dict[str, Any]
    moe_ce_num_compressed: int = 0
    moe_ce_variant: str = "ia3"
    ce_source: Optional[str] = None  # converter: where the CE tables came from (ones / checkpoint / reference)
    dtype: Optional[str] = None
    format: str = DIST_FORMAT
    extra: Dict[str, Any] = field(default_factory=dict)  # anything else a writer recorded (e.g. calibration)

    @classmethod
    def from_dict(cls, obj: Dict[str, Any], source: str = META_NAME) -> "ModelRecord":
        if not isinstance(obj.get("hf_config"), dict):
            raise FormatError(f"{source}: no hf_config object (not written by convert_hf_to_megatron?)")
        known = {f.name for f in fields(cls)} - {"extra", "model_type", "hf_config"}
        rec = cls(obj.get("model_type"), obj["hf_config"], **{k: v for k, v in obj.items() if k in known})
        rec.extra = {k: v for k, v in obj.items() if k not in known | {"model_type", "hf_config"}}
        try:
            rec.moe_ce_num_compressed = int(rec.moe_ce_num_compressed or 0)
        except (TypeError, ValueError):
            raise FormatError(f"{source}: moe_ce_num_compressed must be an integer, found "
                              f"{rec.moe_ce_num_compressed!r}") from None
        rec.moe_ce_variant = rec.moe_ce_variant or "ia3"
        return rec

    @classmethod
    def read(cls, path: str) -> "ModelRecord":
        return cls.from_dict(read_json_object(path), path)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    def write(self, *dirs: str) -> None:
        data = json.dumps(self.to_dict(), indent=2).encode()
        for d in dirs:
            atomic_write(os.path.join(d, META_NAME), data)


def find_record(*dirs: Optional[str]) -> Optional[str]:
    """The first megatron_ce.json among `dirs` (None entries skipped)."""
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, META_NAME)):
            return os.path.join(d, META_NAME)
    return None


def read_train_state(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """train_state.json (None for weights-only checkpoints: converted or calibrated ones)."""
    path = os.path.join(ckpt_dir, STATE)
    if not os.path.isfile(path):
        return None
    state = read_json_object(path)
    if "iteration" not in state:
        raise FormatError(f"{path}: not a training state file (no 'iteration')")
    return state
