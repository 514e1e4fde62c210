"""HF <-> megatron-core checkpoint conversion: a mapping engine plus one declarative table per family
(`megatron_ce/models/<family>/conversion.py`, found through `megatron_ce.models.registry`).

    convert_hf_to_megatron(load_dir, save_dir, moe_ce_num_compressed=None, moe_ce_variant=None, ...)
    convert_megatron_to_hf(load_dir, save_dir, dtype="auto", max_shard_size="2GB", ...)

See `engine` for the flow, `mapping` for the typed mappings, megatron_ce/models/olmoe/conversion.py for a table.
"""

from megatron_ce.convert.engine import (
    META_NAME,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    resolve_checkpoint_dir,
)
from megatron_ce.convert.mapping import QKV, ConversionError, Direct, GatedMLP, Ones, Router, Sliced
from megatron_ce.models.registry import CETables, Family, get_family, register, supported_model_types

__all__ = [
    "META_NAME",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "resolve_checkpoint_dir",
    "CETables",
    "Family",
    "get_family",
    "register",
    "supported_model_types",
    "ConversionError",
    "Direct",
    "Router",
    "QKV",
    "GatedMLP",
    "Ones",
    "Sliced",
]
