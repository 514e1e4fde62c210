"""Megatron -> HF as plan -> validate -> stream -> write (the flow: convert/engine.py's docstring).

plan      the checkpoint folder, the model (megatron_ce.json or --hf-config), the layout model, where the
          CE tables go (`ce_export_mappings`), the keys to read (older checkpoints: convert/keys.py);
validate  the checkpoint's model tensors against the layout (one error), and an output folder that holds
          weights already;
stream    one layer at a time: its parameters read as regions of the global tensors (any saved layout),
          converted and appended to safetensors shards;
write     config.json (+ CE modeling code or the reference's n_ce), the tokenizer recorded with the
          checkpoint (or `tokenizer`) and generation_config.json: the folder loads on its own.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_ce import checkpoint_format as fmt
from megatron_ce.convert.checks import check_new_hf_dir, problems_message, shape_problems
from megatron_ce.convert.dist_io import DistCheckpointReader, ModelLayout
from megatron_ce.models.registry import Family, get_family
from megatron_ce.convert.hf_io import ShardedSafetensorsWriter, parse_size
from megatron_ce.convert.keys import legacy_key_renames
from megatron_ce.convert.layout import group_of, index_bounds, layout_of, progress_bar
from megatron_ce.convert.mapping import Bound, ConversionError, Direct, expand
from megatron_ce.convert.settings import conversion_errors, dtype_name, model_record, parse_dtype, strip_ce
from megatron_ce.hf.tokenizer_files import copy_hf_files, load_override, make_self_contained

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # other keys: optimizer state, RNG, ...


@dataclass
class MegatronToHFPlan:
    load_dir: str
    ckpt_dir: str  # the dist checkpoint folder load_dir resolves to
    save_dir: str
    family: Family
    base_cfg: Dict[str, Any]  # the HF config without its CE fields
    k_a: int
    variant: str
    ce_format: str  # native / reference
    cast: Optional[torch.dtype]  # None: each tensor keeps its dtype
    ckpt: DistCheckpointReader
    config: Any  # the layout model's TransformerConfig
    layout: ModelLayout
    bounds: List[Bound]


def convert_megatron_to_hf(
    load_dir: str,
    save_dir: str,
    *,
    dtype: Optional[str] = "auto",
    max_shard_size="2GB",
    hf_config: Optional[str] = None,
    model_type: Optional[str] = None,
    moe_ce_num_compressed: Optional[int] = None,
    moe_ce_variant: Optional[str] = None,
    ce_format: str = "native",
    tokenizer: Optional[str] = None,
    progress: bool = True,
) -> List[str]:
    """Convert a megatron-core dist checkpoint (any TP/EP/PP) to an HF model folder that loads on its own:
    safetensors, config.json, tokenizer and generation_config.json. Returns the written shard names.
    The model description comes from megatron_ce.json, or from `hf_config` (a config.json path) plus
    the CE flags. `ce_format`: "native" (our `mlp.ce.*` tables and modeling code) or "reference" (the
    reference implementation's `mlp.ces` + `n_ce`). `tokenizer` (a folder or hub name) replaces the
    one recorded with the checkpoint (megatron_ce/hf/tokenizer_files.py)."""
    with conversion_errors():
        # loaded first: a wrong tokenizer fails before minutes of weight conversion
        override = load_override(tokenizer) if tokenizer is not None else None
        plan = plan_megatron_to_hf(load_dir, save_dir, dtype=dtype, hf_config=hf_config, model_type=model_type,
                                   moe_ce_num_compressed=moe_ce_num_compressed, moe_ce_variant=moe_ce_variant,
                                   ce_format=ce_format)
        validate(plan)
        shards, out_dtype = stream(plan, max_shard_size, progress)
        write(plan, out_dtype)
        make_self_contained(plan.save_dir, plan.load_dir, tokenizer, override)
    return shards


def plan_megatron_to_hf(load_dir, save_dir, *, dtype="auto", hf_config=None, model_type=None,
                        moe_ce_num_compressed=None, moe_ce_variant=None, ce_format="native") -> MegatronToHFPlan:
    """Everything decided before a tensor is read: reads the record and the checkpoint's .metadata."""
    load_dir, save_dir = os.fspath(load_dir), os.fspath(save_dir)
    ckpt_dir = fmt.resolve_checkpoint_dir(load_dir)
    rec = model_record(ckpt_dir, load_dir, hf_config)
    family = get_family(model_type or rec.model_type)
    base_cfg = strip_ce(rec.hf_config)
    k_a = rec.moe_ce_num_compressed if moe_ce_num_compressed is None else int(moe_ce_num_compressed)
    variant = moe_ce_variant or rec.moe_ce_variant
    cast = parse_dtype(dtype)
    ckpt = DistCheckpointReader(ckpt_dir)
    config, layout = layout_of(family, base_cfg, k_a, variant)
    mappings = list(family.table(config)) + ce_export_mappings(family, config, k_a, variant, ce_format)
    bounds = expand(mappings, family.ranges(config))
    index_bounds(bounds, layout)
    # a checkpoint written before the TE-layout keys holds some tensors under their older names
    layout.rename_keys(legacy_key_renames(layout.keys(), ckpt.tensors))
    return MegatronToHFPlan(load_dir, ckpt_dir, save_dir, family, base_cfg, k_a, variant, ce_format, cast, ckpt,
                            config, layout, bounds)


def ce_export_mappings(family: Family, config, k_a: int, variant: str, ce_format: str) -> List:
    """Where an export's CE tables go (the one place that decides): nowhere without CE, our per-table
    names (`native`), or the reference implementation's `ces` [n, 3, d] (`reference`, which can hold
    only the ia3 tables of an OLMoE-like family with ffn <= hidden)."""
    if ce_format not in ("native", "reference"):
        raise ConversionError(f"--format {ce_format}: expected native or reference")
    if ce_format == "native":
        return [Direct(family.ce.megatron[variant][r], family.ce.hf[variant][r]) for r in family.ce.hf[variant]] if k_a else []
    ffn, d = config.moe_ffn_hidden_size, config.hidden_size
    problem = (
        f"model_type {family.model_type} has no reference CE format (the reference code covers OLMoE only)"
        if family.ce.reference is None else
        "the checkpoint has no compressed experts (moe_ce_num_compressed=0); the reference format needs n_ce >= 1"
        if k_a == 0 else
        f"CE variant {variant} has no place in the reference `ces` tensor (it holds the ia3 tables)"
        if variant != "ia3" else
        f"the reference `ces` [n, 3, hidden={d}] cannot hold theta_down of size ffn={ffn} (needs ffn <= hidden)"
        if ffn > d else None)
    if problem:
        raise ConversionError(f"--format reference: {problem}")
    return list(family.ce.reference())


def validate(plan: MegatronToHFPlan) -> None:
    """The checkpoint's model tensors against the layout, every problem in one error; then the output."""
    want = plan.layout.keys()
    have = {k: plan.ckpt.shape(k) for k in plan.ckpt.tensors if k in want or k.startswith(MODEL_PREFIXES)}
    missing, unexpected, misshaped = shape_problems(want, have)
    if missing or unexpected or misshaped:
        hint = []
        if any(".mlp.ce." in k for k in unexpected):
            hint.append("the checkpoint has CE tables: set moe_ce_num_compressed in megatron_ce.json or pass --moe-ce-num-compressed")
        if any(".mlp.ce." in k for k in missing):
            hint.append("the checkpoint has no (or other) CE tables than megatron_ce.json declares")
        what = f"Megatron checkpoint {plan.ckpt_dir} does not match model_type {plan.family.model_type}"
        raise ConversionError(problems_message(what, missing, unexpected, misshaped, hint))
    check_new_hf_dir(plan.save_dir)


def layer_groups(bounds: List[Bound]) -> "OrderedDict[str, List[Bound]]":
    """The bound mappings per streaming group, in file order: embedding, layer 0..N-1, final."""
    groups: "OrderedDict[str, List[Bound]]" = OrderedDict()
    for b in bounds:
        groups.setdefault(group_of(next(iter(b.megatron.values()))), []).append(b)
    order = ["embedding"] + [g for g in groups if g.startswith("layer ")] + ["final"]
    return OrderedDict((g, groups[g]) for g in order if g in groups)


def stream(plan: MegatronToHFPlan, max_shard_size, progress: bool) -> Tuple[List[str], Optional[torch.dtype]]:
    """Write the HF tensors one layer at a time; returns (shard names, dtype of the output)."""
    ctx, groups = plan.family.context(plan.config), layer_groups(plan.bounds)
    tensors = output_tensors(plan, groups, ctx)
    writer = ShardedSafetensorsWriter(plan.save_dir, tensors, parse_size(max_shard_size))
    bar = progress_bar(len(groups), "Megatron -> HF", progress)
    for bounds in groups.values():
        for name, t in convert_group(plan, bounds, ctx):
            writer.add(name, t.to(plan.cast) if plan.cast is not None else t)
        bar.update(1)
    shards = writer.close()
    bar.close()
    return shards, (tensors[0][2] if tensors else None)


def output_tensors(plan: MegatronToHFPlan, groups, ctx) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of every output tensor in write order (the shard writer sizes shards
    from it before any data): the cast, else the dtype the checkpoint stores the source under."""
    mc_shapes, out = plan.layout.shapes(), []
    for bounds in groups.values():
        for b in bounds:
            dt = plan.cast or plan.ckpt.dtype(plan.layout.params[next(iter(b.megatron.values()))].key)
            out += [(name, shape, dt) for name, shape in b.hf_shapes(mc_shapes, ctx).items()]
    return out


def convert_group(plan: MegatronToHFPlan, bounds: List[Bound], ctx) -> Iterator[Tuple[str, torch.Tensor]]:
    """One group's HF tensors: its parameters read as regions of the global tensors in one request."""
    params = [n for b in bounds for n in b.megatron.values()]
    lay = plan.layout.params
    requests = [(lay[n].key, lay[n].base_offset, lay[n].region_sizes) for n in params]
    tensors = {n: t.reshape(lay[n].shape) for n, t in zip(params, plan.ckpt.read(requests))}
    for b in bounds:
        yield from b.to_hf({n: tensors.pop(n) for n in b.megatron.values()}, ctx).items()


def write(plan: MegatronToHFPlan, out_dtype: Optional[torch.dtype]) -> None:
    """config.json (+ the CE modeling code, or the reference's n_ce) and the HF side files the converter
    kept beside the checkpoint (SAVE/hf_files: the source model's tokenizer and generation config)."""
    copy_hf_files(os.path.join(os.path.dirname(os.path.abspath(plan.ckpt_dir)), fmt.HF_FILES_DIR), plan.save_dir)
    export = plan.family.export_config(dict(plan.base_cfg))
    export["architectures"] = list(plan.family.architectures)
    export["model_type"] = plan.family.model_type
    if out_dtype is not None:
        for k in [k for k in ("dtype", "torch_dtype") if k in export] or ["dtype"]:
            export[k] = dtype_name(out_dtype)
    if plan.k_a > 0:
        from megatron_ce.hf.export import install_ce_modeling, reference_config

        if plan.ce_format == "reference":
            reference_config(export, plan.k_a)
        else:  # CE modeling code beside the weights + auto_map/architectures (trust_remote_code loading)
            export["moe_ce_num_compressed"] = plan.k_a
            export["moe_ce_variant"] = plan.variant
            install_ce_modeling(plan.save_dir, export, plan.family.model_type)
    with open(os.path.join(plan.save_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(export, f, indent=2, sort_keys=True)
