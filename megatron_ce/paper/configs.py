"""Released model configs, embedded so the tools need no download: each family's `paper_hf_config`
preset (megatron_ce/models/<family>/presets.py: allenai/OLMoE-1B-7B-0924, microsoft/Phi-3.5-MoE-instruct)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Tuple

from megatron_ce.models import registry


def builtin_config(family: str) -> Dict[str, Any]:
    """A copy of the released HF config of a built-in family."""
    return copy.deepcopy(registry.presets(family).paper_hf_config)


# family name -> released HF config (read-only view; load_model_config returns copies)
BUILTIN = {mt: registry.presets(mt).paper_hf_config for mt in registry.builtin_model_types()}


def load_model_config(name_or_path: str) -> Tuple[str, Dict[str, Any]]:
    """(family model_type, HF config dict) for a built-in name or a config.json path / directory."""
    if name_or_path in BUILTIN:
        return name_or_path, builtin_config(name_or_path)
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    mt = cfg.get("model_type", "")
    family = registry.base_model_type(mt)  # a CE export ("olmoe_ce") counts as its base family
    if family not in BUILTIN:
        raise ValueError(f"{path}: model_type {mt!r} is not {' or '.join(BUILTIN)}")
    return family, cfg


def num_experts(cfg: Dict[str, Any]) -> int:
    return int(cfg.get("num_experts") or cfg.get("num_local_experts"))
