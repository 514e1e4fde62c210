"""Write a calibrated model as a weights-only checkpoint in the converter's `release` layout
(megatron_ce/checkpoint_format.py): SAVE/release/ (torch_dist), megatron_ce.json in both folders with
a `calibration` record, the source's tokenizer / HF files copied, the tracker ("release") last."""

import os
import shutil
from typing import Any, Dict, Optional


from megatron_ce.checkpoint_format import (
    HF_FILES_DIR,
    META_NAME,
    RELEASE,
    TOKENIZER_DIR,
    TRACKER,
    ModelRecord,
    find_record,
    write_tracker,
)
from megatron_ce.calibrate.modes import CalibrationError
from megatron_ce.runtime.parallel import barrier, is_rank0

CALIBRATION_JSON = "calibration.json"  # the record of a model without megatron_ce.json (shape flags)


def check_save_dir(save: str) -> None:
    """Refuse to overwrite a checkpoint (checked before the calibration spends its time)."""
    if os.path.exists(os.path.join(save, TRACKER)) or os.path.exists(os.path.join(save, RELEASE)):
        raise CalibrationError(f"--save={save} already holds a checkpoint; give a new folder")


def output_record(model_record: Optional[Dict[str, Any]], load_root: str, load_ckpt: str,
                  calibration: Dict[str, Any]) -> Optional[ModelRecord]:
    """The source's megatron_ce.json (provenance kept) with the CE settings the model was built with
    and the calibration record; None for a model built from shape flags."""
    if model_record is None:
        return None
    built = ModelRecord.from_dict(model_record)
    path = find_record(load_ckpt, load_root)
    record = ModelRecord.read(path) if path else built
    record.moe_ce_num_compressed, record.moe_ce_variant = built.moe_ce_num_compressed, built.moe_ce_variant
    record.ce_source = "calibration"
    record.extra["calibration"] = calibration
    return record


def save_calibrated(model, save: str, load_root: str, load_ckpt: str, record: Optional[ModelRecord],
                    calibration: Dict[str, Any]) -> str:
    """Write the checkpoint (all ranks call this); returns its dist checkpoint folder. load_root is the
    --load folder, load_ckpt the checkpoint folder inside it that was loaded (its tokenizer / HF files
    are copied too)."""
    from megatron.core import dist_checkpointing

    ckpt = os.path.join(save, RELEASE)
    if is_rank0():
        os.makedirs(ckpt, exist_ok=True)
    barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    barrier()
    if is_rank0():
        _write_side_files(save, ckpt, load_root, load_ckpt, record, calibration)
        write_tracker(save, RELEASE)  # last: the checkpoint is complete once the tracker names it
    barrier()
    return ckpt


def _write_side_files(save, ckpt, load_root, load_ckpt, record, calibration):
    import json

    if record is not None:
        record.write(save, ckpt)
    else:
        with open(os.path.join(ckpt, CALIBRATION_JSON), "w", encoding="utf-8") as f:
            json.dump(calibration, f, indent=2)
    for name in (TOKENIZER_DIR, HF_FILES_DIR):
        for src_dir, dst_dir in ((load_root, save), (load_ckpt, ckpt)):
            src = os.path.join(src_dir, name) if src_dir else None
            if src and os.path.isdir(src) and not os.path.exists(os.path.join(dst_dir, name)):
                shutil.copytree(src, os.path.join(dst_dir, name))


__all__ = ["check_save_dir", "output_record", "save_calibrated", "META_NAME"]
