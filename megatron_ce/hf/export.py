"""Make an exported HF checkpoint directory load our CE modeling code via `auto_map`.

`install_ce_modeling(save_dir, config_dict)` copies the self-contained modeling/configuration files
into save_dir and sets `model_type` (e.g. "olmoe_ce"), `architectures` and `auto_map` in the (not yet
written) config dict, so that `AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True)`
builds the CE model (and loading without trust_remote_code fails instead of dropping CE).
`base_model_type` maps the CE model_type back to the converter family when such a dir is re-imported.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))

# base model_type -> (CE model_type, files to copy, architectures, auto_map)
CE_MODELING = {
    "olmoe": (
        "olmoe_ce",
        ("configuration_olmoe_ce.py", "modeling_olmoe_ce.py"),
        ["OlmoeCEForCausalLM"],
        {
            "AutoConfig": "configuration_olmoe_ce.OlmoeCEConfig",
            "AutoModel": "modeling_olmoe_ce.OlmoeCEModel",
            "AutoModelForCausalLM": "modeling_olmoe_ce.OlmoeCEForCausalLM",
        },
    ),
    "phimoe": (
        "phimoe_ce",
        ("configuration_phimoe_ce.py", "modeling_phimoe_ce.py"),
        ["PhimoeCEForCausalLM"],
        {
            "AutoConfig": "configuration_phimoe_ce.PhimoeCEConfig",
            "AutoModel": "modeling_phimoe_ce.PhimoeCEModel",
            "AutoModelForCausalLM": "modeling_phimoe_ce.PhimoeCEForCausalLM",
        },
    ),
}


def supported_ce_model_types():
    return sorted(CE_MODELING)


def base_model_type(model_type):
    """The base family of a CE export's model_type ("olmoe_ce" -> "olmoe"); others unchanged."""
    for base, (ce_type, *_rest) in CE_MODELING.items():
        if model_type == ce_type:
            return base
    return model_type


def install_ce_modeling(save_dir: str, config: Dict[str, Any], model_type: str) -> Dict[str, Any]:
    """Copy the CE modeling files for `model_type` into save_dir; update `config` in place (and return it).
    A family without HF CE modeling code yet: a warning, config unchanged (weights are still exported)."""
    if model_type not in CE_MODELING:
        warnings.warn(
            f"no HF CE modeling code for model_type {model_type!r} (available: "
            f"{', '.join(supported_ce_model_types())}): the export has CE tables but loads only as the "
            "stock model, which ignores them"
        )
        return config
    ce_type, files, architectures, auto_map = CE_MODELING[model_type]
    os.makedirs(save_dir, exist_ok=True)
    for name in files:
        shutil.copy2(os.path.join(HERE, name), os.path.join(save_dir, name))
    config["model_type"] = ce_type
    config["architectures"] = list(architectures)
    config["auto_map"] = dict(auto_map)
    return config
