"""HF -> Megatron as plan -> validate -> stream -> write (the flow: convert/engine.py's docstring).

plan      config.json, the family, k_a / variant, the layout model, where the CE tables come from, the
          table expanded over layers and experts and checked to cover the model;
validate  the HF checkpoint against the table (missing / unexpected / mis-shaped: one error), and an
          output folder that would be overwritten;
stream    each mcore parameter produced from its HF tensors when the writer asks for it;
write     the torch_dist checkpoint one layer at a time, then hf_files/, megatron_ce.json, the tracker.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_ce import checkpoint_format as fmt
from megatron_ce.convert.checks import check_new_checkpoint_dir, problems_message, shape_problems
from megatron_ce.convert.dist_io import ModelLayout, write_dist_checkpoint
from megatron_ce.models.registry import Family, get_family
from megatron_ce.convert.hf_io import HFCheckpointReader
from megatron_ce.convert.layout import group_of, index_bounds, layout_of, progress_bar
from megatron_ce.convert.mapping import Bound, ConversionError, Direct, Ones, expand
from megatron_ce.convert.settings import (
    conversion_errors,
    dtype_name,
    import_ce_settings,
    parse_dtype,
    read_model_dir_config,
    strip_ce,
)
from megatron_ce.hf.tokenizer_files import copy_hf_files


@dataclass
class HFToMegatronPlan:
    load_dir: str
    save_dir: str
    family: Family
    base_cfg: Dict[str, Any]  # the HF config without its CE fields (what megatron_ce.json records)
    k_a: int
    variant: str
    cast: Optional[torch.dtype]  # None: each tensor keeps its dtype
    reader: HFCheckpointReader
    config: Any  # the layout model's TransformerConfig
    layout: ModelLayout
    ce_source: str  # none / checkpoint / reference / ones
    bounds: List[Bound]
    by_param: Dict[str, Bound]

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.save_dir, fmt.RELEASE)


def convert_hf_to_megatron(
    load_dir: str,
    save_dir: str,
    *,
    moe_ce_num_compressed: Optional[int] = None,
    moe_ce_variant: Optional[str] = None,
    model_type: Optional[str] = None,
    dtype: Optional[str] = "auto",
    progress: bool = True,
) -> str:
    """Convert an HF model directory to a megatron-core dist checkpoint. Returns the checkpoint dir.

    moe_ce_num_compressed: k_a. None: what config.json says (ours: moe_ce_num_compressed; reference:
        n_ce), else 0. CE tables come from the checkpoint when it has them (our export names, or the
        reference's `ces` [n, 3, d]), else they are written as ones (`ce_import_mappings`).
    dtype: 'auto' keeps each tensor's dtype; fp32/bf16/fp16 casts every tensor.
    """
    with conversion_errors():
        plan = plan_hf_to_megatron(load_dir, save_dir, moe_ce_num_compressed=moe_ce_num_compressed,
                                   moe_ce_variant=moe_ce_variant, model_type=model_type, dtype=dtype)
        validate(plan)
        write(plan, ParamStream(plan), progress)
    return plan.ckpt_dir


def plan_hf_to_megatron(load_dir, save_dir, *, moe_ce_num_compressed=None, moe_ce_variant=None,
                        model_type=None, dtype="auto") -> HFToMegatronPlan:
    """Everything decided before a tensor is read: reads config.json and the safetensors headers."""
    load_dir, save_dir = os.fspath(load_dir), os.fspath(save_dir)
    hf_cfg = read_model_dir_config(load_dir)
    family = get_family(model_type or hf_cfg.get("model_type"))
    cast = parse_dtype(dtype)
    k_a, variant = import_ce_settings(hf_cfg, moe_ce_num_compressed, moe_ce_variant)
    base_cfg = strip_ce(hf_cfg)
    reader = HFCheckpointReader(load_dir, family.fused_experts, family.hf_aliases)
    config, layout = layout_of(family, base_cfg, k_a, variant)
    ce_source, ce_mappings = ce_import_mappings(family, config, reader, k_a, variant,
                                                declared=moe_ce_num_compressed is None)
    bounds = expand(list(family.table(config)) + ce_mappings, family.ranges(config))
    return HFToMegatronPlan(load_dir, save_dir, family, base_cfg, k_a, variant, cast, reader, config, layout,
                            ce_source, bounds, index_bounds(bounds, layout))


def ce_import_mappings(family: Family, config, reader: HFCheckpointReader, k_a: int, variant: str,
                       declared: bool) -> Tuple[str, List]:
    """Where an import's CE tables come from (the one place that decides), as (ce_source, mappings):
    none without CE; the checkpoint's own tables under our export names; the reference implementation's
    `ces` [n, 3, d]; or ones, created here - unless config.json itself declares CE (`declared`: k_a
    comes from it, not from the flag), whose tables must then be in the checkpoint."""
    if k_a == 0:
        return "none", []
    ours = {r: p.format(layer=0) for r, p in family.ce.hf[variant].items()}
    if all(n in reader for n in ours.values()):
        return "checkpoint", [Direct(family.ce.megatron[variant][r], family.ce.hf[variant][r]) for r in ours]
    probe = family.ce.reference_probe
    if probe and probe in reader:
        _check_reference_ces(family.context(config), variant)
        return "reference", list(family.ce.reference())
    if declared:
        raise ConversionError(
            f"config.json declares {k_a} compressed experts but the checkpoint has no CE tables "
            f"(looked for {', '.join(ours.values())}" + (f" or {probe}" if probe else "")
            + "); pass --moe-ce-num-compressed to create them as ones"
        )
    return "ones", [Ones(*family.ce.megatron[variant].values())]


def _check_reference_ces(ctx, variant: str) -> None:
    """The reference's `ces` holds ia3 tables with theta_down in the first ffn of its d entries."""
    if variant != "ia3":
        raise ConversionError(f"the reference CE tensor holds ia3 tables; --moe-ce-variant={variant} cannot use it")
    if ctx.moe_ffn_hidden_size > ctx.hidden_size:
        raise ConversionError(
            f"the reference CE tensor `ces` is [n, 3, hidden={ctx.hidden_size}] and cannot hold "
            f"theta_down of size ffn={ctx.moe_ffn_hidden_size} (the reference code needs ffn <= hidden)"
        )


def validate(plan: HFToMegatronPlan) -> None:
    """The HF checkpoint against the table, every problem in one error; then the output folder."""
    ctx, mc_shapes = plan.family.context(plan.config), plan.layout.shapes()
    want: Dict[str, Tuple[int, ...]] = {}
    for b in plan.bounds:
        want.update(b.hf_shapes(mc_shapes, ctx))
    ignore = [re.compile(p) for p in plan.family.hf_ignore]
    have = {n: plan.reader.shape(n) for n in plan.reader.keys() if not any(p.fullmatch(n) for p in ignore)}
    missing, unexpected, misshaped = shape_problems(want, have)
    if missing or unexpected or misshaped:
        what = f"HF checkpoint {plan.load_dir} does not match model_type {plan.family.model_type}"
        raise ConversionError(problems_message(what, missing, unexpected, misshaped))
    check_new_checkpoint_dir(plan.ckpt_dir)


class ParamStream:
    """Each mcore parameter made from its HF tensors (read lazily from safetensors) when the writer asks
    for it: a mapping's outputs are made together and kept until the writer moves to another mapping,
    and the safetensors maps are released after each layer, so memory stays at about one layer."""

    def __init__(self, plan: HFToMegatronPlan):
        self.plan = plan
        self.ctx = plan.family.context(plan.config)
        self.shapes = plan.layout.shapes()
        self.ref_dtype, self.key_dtypes = storage_dtypes(plan)
        self.cache: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            self.cache.clear()
            out = self._make(self.plan.by_param[name], name)
            for n, t in out.items():
                if tuple(t.shape) != tuple(self.shapes[n]):
                    raise ConversionError(f"{n}: converted shape {list(t.shape)} != model shape {list(self.shapes[n])}")
            self.cache.update(out)
        return self.cache[name]

    def _make(self, b: Bound, name: str) -> Dict[str, torch.Tensor]:
        if isinstance(b.mapping, Ones):
            dtype = self.key_dtypes[self.plan.layout.params[name].key]
            out = b.mapping.make({r: self.shapes[n] for r, n in b.megatron.items()}, dtype)
            return {b.megatron[r]: t for r, t in out.items()}
        try:
            return b.to_megatron({n: self.plan.reader.get(n) for n in b.hf.values()}, self.ctx)
        except ValueError as e:
            raise ConversionError(f"{name}: {e}") from e

    def layer_done(self) -> None:
        self.cache.clear()
        self.plan.reader.release()


def storage_dtypes(plan: HFToMegatronPlan) -> Tuple[torch.dtype, Dict[str, torch.dtype]]:
    """(dtype of created tensors and of the record, dtype of each stored key): the cast, else the source
    tensor's; created tensors (CE ones) take the first HF tensor's."""
    first_hf = next(n for b in plan.bounds for n in b.hf.values())
    ref = plan.cast or plan.reader.dtype(first_hf)
    out: Dict[str, torch.dtype] = {}
    for name, p in plan.layout.params.items():
        b = plan.by_param[name]
        out.setdefault(p.key, plan.cast or (plan.reader.dtype(next(iter(b.hf.values()))) if b.hf else ref))
    return ref, out


def write(plan: HFToMegatronPlan, stream: ParamStream, progress: bool) -> None:
    """The checkpoint, its HF side files and record, and the tracker last (a reader that finds the
    tracker finds a complete checkpoint)."""
    groups = list(OrderedDict.fromkeys(group_of(n) for n in plan.layout.params))
    bar = progress_bar(len(groups), "HF -> Megatron", progress)

    def group_done(_group):
        stream.layer_done()
        bar.update(1)

    write_dist_checkpoint(plan.ckpt_dir, plan.layout, stream.key_dtypes, stream, group_of, group_done)
    bar.close()
    copy_hf_files(plan.load_dir, os.path.join(plan.save_dir, fmt.HF_FILES_DIR))
    fmt.ModelRecord(plan.family.model_type, plan.base_cfg, moe_ce_num_compressed=plan.k_a, moe_ce_variant=plan.variant,
                    ce_source=plan.ce_source, dtype=dtype_name(stream.ref_dtype)).write(plan.save_dir, plan.ckpt_dir)
    fmt.write_tracker(plan.save_dir, fmt.RELEASE)
