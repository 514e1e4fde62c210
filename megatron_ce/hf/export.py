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

import dataclasses
import os
import shutil
import warnings
from typing import Any, Dict, List, Optional

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
    A family without HF CE modeling code yet: a warning, config unchanged (weights are still exported).
    A reference-format export (see `convert_megatron_to_reference`): the reference config instead."""
    if model_type.endswith(REFERENCE_SUFFIX):
        return reference_config(config, model_type[: -len(REFERENCE_SUFFIX)])
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


# ------------------------------------------------------------------------------------------
# Export in the reference implementation's format
# ------------------------------------------------------------------------------------------

# The converter family used for a reference export is the base family under this suffixed name (a
# name no HF model_type has): its table maps the CE tables to the reference tensor, and the engine hands
# the suffixed name to `install_ce_modeling`, which then writes the reference config.
REFERENCE_SUFFIX = "+reference"


def reference_config(config: Dict[str, Any], base_type: str) -> Dict[str, Any]:
    """The reference's config: the base model's (model_type e.g. "olmoe", no auto_map) plus `n_ce`.

    The reference code builds its own modeling class from the stock OLMoE config class (its
    config_olmoe_ce.json is OLMoE's with n_ce added), so model_type stays the base one and no modeling
    code is shipped. Loaded with stock transformers such a directory is a plain OLMoE that ignores `ces`
    (the reference's own behaviour); our importer reads `n_ce` and `ces` back."""
    k_a = int(config.pop("moe_ce_num_compressed", 0) or 0)
    for key in ("moe_ce_variant", "auto_map"):
        config.pop(key, None)
    config["model_type"] = base_type
    config["n_ce"] = k_a
    return config


def _refuse(msg: str):
    from megatron_ce.convert.mapping import ConversionError

    raise ConversionError(f"--format reference: {msg}")


def _base_model_type(load_dir: str, hf_config: Optional[str], model_type: Optional[str]) -> Optional[str]:
    """The family the engine will pick (flag, else --hf-config, else megatron_ce.json)."""
    if model_type:
        return model_type
    if hf_config is not None:
        from megatron_ce.convert.hf_io import read_json

        if not os.path.isfile(hf_config):
            _refuse(f"--hf-config {hf_config} does not exist")
        cfg = read_json(hf_config)
        return base_model_type(cfg.get("model_type")) if isinstance(cfg, dict) else None
    from megatron_ce.convert.engine import read_meta, resolve_checkpoint_dir

    return read_meta(resolve_checkpoint_dir(load_dir), load_dir).get("model_type")


def _reference_table(family, config):
    """The family's table with the CE tables mapped to the reference tensor; refuses what it cannot hold."""
    k_a = int(getattr(config, "moe_ce_num_compressed", 0) or 0)
    variant = getattr(config, "moe_ce_variant", "ia3")
    ffn, d = config.moe_ffn_hidden_size, config.hidden_size
    if k_a == 0:
        _refuse("the checkpoint has no compressed experts (moe_ce_num_compressed=0); the reference format "
                "needs n_ce >= 1")
    if variant != "ia3":
        _refuse(f"CE variant {variant} has no place in the reference `ces` tensor (it holds the ia3 tables)")
    if ffn > d:
        _refuse(f"the reference `ces` [n, 3, hidden={d}] cannot hold theta_down of size ffn={ffn} "
                "(needs ffn <= hidden)")
    return list(family.table(config)) + list(family.ce.reference())


def convert_megatron_to_reference(load_dir, save_dir, *, hf_config=None, model_type=None, **kwargs) -> List[str]:
    """`convert_megatron_to_hf` writing the reference implementation's layout: per-expert OLMoE weights,
    `model.layers.N.mlp.ces` [n, 3, d] (slots gate, down[:ffn] padded with ones, up) and config `n_ce`.
    Refused (ConversionError) for k_a = 0, the hidden variant, ffn > hidden and families the reference
    code does not cover (Phi-MoE)."""
    from megatron_ce.convert import families
    from megatron_ce.convert.engine import convert_megatron_to_hf

    base = _base_model_type(os.fspath(load_dir), hf_config, model_type)
    family = families.get_family(base)
    if family.ce.reference is None:
        _refuse(f"model_type {family.model_type} has no reference CE format (the reference code covers OLMoE only)")
    derived = dataclasses.replace(
        family,
        model_type=family.model_type + REFERENCE_SUFFIX,
        table=lambda config: _reference_table(family, config),
        # no per-table CE names: the reference tensor comes from the table above
        ce=dataclasses.replace(family.ce, hf={v: {} for v in family.ce.hf}),
    )
    # Registered only for this call: the engine looks families up by name. (families has no public
    # unregister; the entry must not outlive the call, where it would be offered for imports.)
    families.register(derived)
    try:
        return convert_megatron_to_hf(load_dir, save_dir, hf_config=hf_config, model_type=derived.model_type, **kwargs)
    finally:
        families._FAMILIES.pop(derived.model_type, None)
