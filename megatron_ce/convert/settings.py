"""What a conversion is asked for: the output dtype, and the model's CE settings from the flags and the
HF config (ours: moe_ce_num_compressed / moe_ce_variant; the reference implementation's: n_ce)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_ce import checkpoint_format as fmt
from megatron_ce.convert.mapping import ConversionError

DTYPES = {
    "auto": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# HF config fields that describe CE: the mcore model gets them from k_a / variant instead.
CE_CONFIG_KEYS = ("moe_ce_num_compressed", "moe_ce_variant", "n_ce", "auto_map")


@contextlib.contextmanager
def conversion_errors():
    """The converters' callers (the CLIs, tests, tools) expect a ConversionError for any bad input:
    a checkpoint folder that breaks the format module's rules becomes one, with the same one line."""
    try:
        yield
    except fmt.FormatError as e:
        raise ConversionError(str(e)) from None


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """--dtype: None / 'auto' keep each tensor's dtype."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype={name!r} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def read_hf_config(path: str) -> Dict[str, Any]:
    """An HF config.json, its model_type read as the base family (a CE export names e.g. olmoe_ce)."""
    from megatron_ce.hf import base_model_type

    cfg = fmt.read_json_object(path)
    if "model_type" in cfg:
        cfg["model_type"] = base_model_type(cfg["model_type"])
    return cfg


def read_model_dir_config(load_dir: str) -> Dict[str, Any]:
    path = os.path.join(load_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {load_dir}")
    return read_hf_config(path)


def strip_ce(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The base model's HF config (CE fields are carried separately)."""
    return {k: v for k, v in cfg.items() if k not in CE_CONFIG_KEYS}


def hf_ce_fields(cfg: Dict[str, Any]) -> Tuple[int, Optional[str]]:
    """(k_a, variant) an HF config declares: ours (moe_ce_*) or the reference's n_ce."""
    k = cfg.get("moe_ce_num_compressed")
    if k is None:
        k = cfg.get("n_ce")
    return int(k or 0), cfg.get("moe_ce_variant")


def import_ce_settings(hf_cfg: Dict[str, Any], k_flag: Optional[int], variant_flag: Optional[str]) -> Tuple[int, str]:
    """(k_a, variant) of an import: the flags over config.json's fields; a variant flag that contradicts
    the checkpoint's tables is refused."""
    cfg_k, cfg_variant = hf_ce_fields(hf_cfg)
    k_a = cfg_k if k_flag is None else int(k_flag)
    if cfg_variant and variant_flag and cfg_variant != variant_flag:
        raise ConversionError(f"--moe-ce-variant={variant_flag} but the checkpoint's CE tables are {cfg_variant!r}")
    return k_a, variant_flag or cfg_variant or "ia3"


def model_record(ckpt_dir: str, load_dir: str, hf_config: Optional[str]) -> fmt.ModelRecord:
    """The model an export describes: `hf_config` (a config.json path, CE fields from it) when given, else
    the checkpoint's megatron_ce.json (in the checkpoint folder, the load dir or the save root)."""
    if hf_config is not None:
        if not os.path.isfile(hf_config):
            raise ConversionError(f"--hf-config {hf_config} does not exist")
        cfg = read_hf_config(hf_config)
        k, variant = hf_ce_fields(cfg)
        return fmt.ModelRecord(cfg.get("model_type"), cfg, moe_ce_num_compressed=k, moe_ce_variant=variant or "ia3")
    path = fmt.find_record(ckpt_dir, load_dir, os.path.dirname(os.path.abspath(ckpt_dir)))
    if path is None:
        raise ConversionError(
            f"no {fmt.META_NAME} next to {ckpt_dir}: pass --hf-config (config.json of the model) and the CE flags"
        )
    return fmt.ModelRecord.read(path)
