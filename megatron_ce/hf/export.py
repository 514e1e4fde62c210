"""Make an exported HF checkpoint directory load our CE modeling code via `auto_map`.

`install_ce_modeling(save_dir, config_dict)` copies the self-contained modeling/configuration files
into save_dir and sets `model_type` (e.g. "olmoe_ce"), `architectures` and `auto_map` in the (not yet
written) config dict, so that `AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True)`
builds the CE model (and loading without trust_remote_code fails instead of dropping CE).
`base_model_type` maps the CE model_type back to the converter family when such a dir is re-imported.

`convert_megatron_to_reference(load_dir, save_dir, ...)` exports instead in the reference
implementation's own layout (OLMoE + `mlp.ces` [n, 3, d] + config `n_ce`; docs/METHOD.md).

Either export gets its tokenizer and generation_config.json afterwards from
`megatron_ce.hf.tokenizer_files.make_self_contained` (tools/convert_megatron_to_hf.py calls it).
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Dict, List

from megatron_ce.models import registry

HERE = os.path.dirname(os.path.abspath(__file__))

# base model_type -> CEExport (CE model_type, files to copy, architectures, auto_map) of the built-in
# families; each family declares its own (megatron_ce/models/<family>/export.py). The functions below
# read the registry, so a family registered later is covered too.
CE_MODELING = registry.ce_exports()


def supported_ce_model_types():
    return sorted(registry.ce_exports())


def base_model_type(model_type):
    """The base family of a CE export's model_type ("olmoe_ce" -> "olmoe"); others unchanged."""
    return registry.base_model_type(model_type)


def install_ce_modeling(save_dir: str, config: Dict[str, Any], model_type: str) -> Dict[str, Any]:
    """Copy the CE modeling files for `model_type` into save_dir; update `config` in place (and return it).
    A family without HF CE modeling code yet: a warning, config unchanged (weights are still exported)."""
    exports = registry.ce_exports()
    if model_type not in exports:
        warnings.warn(
            f"no HF CE modeling code for model_type {model_type!r} (available: "
            f"{', '.join(supported_ce_model_types())}): the export has CE tables but loads only as the "
            "stock model, which ignores them"
        )
        return config
    export = exports[model_type]
    os.makedirs(save_dir, exist_ok=True)
    for name in export.files:
        shutil.copy2(os.path.join(HERE, name), os.path.join(save_dir, name))
    config["model_type"] = export.model_type
    config["architectures"] = list(export.architectures)
    config["auto_map"] = dict(export.auto_map)
    return config


# ------------------------------------------------------------------------------------------
# Export in the reference implementation's format
# ------------------------------------------------------------------------------------------


def reference_config(config: Dict[str, Any], k_a: int) -> Dict[str, Any]:
    """The reference's config: the base model's (model_type e.g. "olmoe", no auto_map) plus `n_ce`.

    The reference code builds its own modeling class from the stock OLMoE config class (its
    config_olmoe_ce.json is OLMoE's with n_ce added), so model_type stays the base one and no modeling
    code is shipped. Loaded with stock transformers such a directory is a plain OLMoE that ignores `ces`
    (the reference's own behaviour); our importer reads `n_ce` and `ces` back."""
    config["n_ce"] = int(k_a)
    return config


def convert_megatron_to_reference(load_dir, save_dir, **kwargs) -> List[str]:
    """`convert_megatron_to_hf` writing the reference implementation's layout: per-expert OLMoE weights,
    `model.layers.N.mlp.ces` [n, 3, d] (slots gate, down[:ffn] padded with ones, up) and config `n_ce`.
    Refused (ConversionError) for k_a = 0, the hidden variant, ffn > hidden and families the reference
    code does not cover (Phi-MoE): see megatron_ce.convert.engine.ce_export_mappings."""
    from megatron_ce.convert.engine import convert_megatron_to_hf

    return convert_megatron_to_hf(load_dir, save_dir, ce_format="reference", **kwargs)
