"""HF <-> megatron-core conversion driven by a family's declarative table.

HF -> Megatron (`convert_hf_to_megatron`):
  1. read config.json, pick the family (model_type, or the override), decide CE (flag / config);
  2. build the family's mcore model at TP=PP=EP=1 on the meta device and read its dist-checkpoint
     layout (keys, global shapes, chunks) from megatron-core itself;
  3. expand the table and check the HF checkpoint against it before writing anything: missing,
     unexpected and mis-shaped tensors -> one ConversionError listing them all;
  4. write a torch_dist checkpoint streaming one layer at a time (tqdm bar per layer): each
     parameter is produced from its HF tensors (read lazily from safetensors) when written.
  Output: SAVE_DIR/latest_checkpointed_iteration.txt ("release"), SAVE_DIR/release/ (the dist
  checkpoint, loadable with `dist_checkpointing.load(model.sharded_state_dict(), dir)` at any
  TP/EP/PP and under --transformer-impl local or transformer_engine: its keys are the TE spec's,
  megatron_ce.ce.spec.with_te_checkpoint_keys), and megatron_ce.json (family, HF config, CE
  settings) in both directories.

Megatron -> HF (`convert_megatron_to_hf`): the reverse, one layer at a time: read each layer's
parameters as regions of the global tensors (works for a checkpoint saved at any layout, by either
--transformer-impl, or converted before the TE-layout keys: megatron_ce/convert/keys.py), convert, and
append to safetensors shards; then config.json (+ CE fields when CE is on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_ce.convert.dist_io import DistCheckpointReader, ModelLayout, model_layout, write_dist_checkpoint
from megatron_ce.convert.families import Family, get_family
from megatron_ce.convert.hf_io import HFCheckpointReader, ShardedSafetensorsWriter, one_line, parse_size, read_json
from megatron_ce.convert.keys import legacy_key_renames
from megatron_ce.convert.mapping import Bound, ConversionError, Direct, Ones, expand
from megatron_ce.hf.tokenizer_files import TOKENIZER_FILE_PATTERNS

META_NAME = "megatron_ce.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE = "release"

DTYPES = {
    "auto": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype={name!r} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------
# world-1 meta model
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def world1_parallel_state():
    """megatron parallel state at TP=PP=EP=1 for building the layout model; restored afterwards
    (RNG state included). Refuses to run inside a multi-rank job."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ce.runtime import destroy_parallel, init_parallel

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConversionError("checkpoint conversion runs in one process (found a multi-rank job)")
    rng = torch.get_rng_state()
    created = False
    had_pg = dist.is_available() and dist.is_initialized()
    if not ps.model_parallel_is_initialized():
        init_parallel()
        created = True
    else:
        sizes = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
        )
        if sizes != (1, 1, 1):
            raise ConversionError(f"conversion needs TP=PP=EP=1 parallel state, found {sizes}")
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        if created:
            if had_pg:
                ps.destroy_model_parallel()  # keep the caller's process group
            else:
                destroy_parallel()


def build_layout_model(family: Family, hf_cfg: Dict[str, Any], k_a: int, variant: str):
    """The family's mcore model at TP=PP=EP=1 on the meta device (parallel state must be world-1).
    Its dist-checkpoint keys are those of the Transformer-Engine spec too (see
    megatron_ce.ce.spec.with_te_checkpoint_keys), so what is written here loads under either
    --transformer-impl, and a TE-trained checkpoint is read back with this layout."""
    # imported here: megatron_ce.runtime imports megatron-core, whose import-time warnings the converter
    # CLIs silence first (convert/cli.py)
    from megatron_ce.runtime.quiet import quiet_layer_build

    with torch.device("meta"), quiet_layer_build():
        return family.build_model(
            hf_cfg,
            moe_ce_num_compressed=k_a,
            moe_ce_variant=variant,
            perform_initialization=False,
            use_cpu_initialization=True,
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=1,
            expert_tensor_parallel_size=1,
            sequence_parallel=False,
            moe_grouped_gemm=False,  # SequentialMLP: its dist-ckpt keys are what GroupedMLP uses too
        )


def _index(bounds: Sequence[Bound], layout: ModelLayout) -> Dict[str, Bound]:
    """mcore param name -> the bound mapping producing it; checks the table covers the model."""
    by_param: Dict[str, Bound] = {}
    problems = []
    for b in bounds:
        for name in b.megatron.values():
            if name in by_param:
                problems.append(f"{name} produced by two mappings")
            by_param[name] = b
    unknown = sorted(set(by_param) - set(layout.params))
    uncovered = [n for n in layout.params if n not in by_param]
    if unknown:
        problems.append(f"table names parameters the model does not have: {unknown}")
    if uncovered:
        problems.append(f"model parameters no table entry produces: {uncovered}")
    if problems:
        raise ConversionError("conversion table does not match the model: " + "; ".join(problems))
    return by_param


def _rename_keys(layout: ModelLayout, renames: Dict[str, str]) -> None:
    """Read (or write) the parameters stored under key k from key renames[k] instead."""
    for p in layout.params.values():
        for ch in p.chunks:
            ch.key = renames.get(ch.key, ch.key)


def _group(name: str) -> str:
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    return f"layer {int(m.group(1))}" if m else ("final" if not name.startswith("embedding.") else "embedding")


def _problems_message(what: str, missing, unexpected, misshaped, extra: Sequence[str] = ()) -> str:
    lines = [f"{what}:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}): " + ", ".join(misshaped))
    lines.extend(f"  {x}" for x in extra)
    return "\n".join(lines)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)


# ------------------------------------------------------------------------------------------
# HF -> Megatron
# ------------------------------------------------------------------------------------------


HF_FILES_DIR = "hf_files"  # tokenizer / generation config kept beside the Megatron checkpoint
_HF_FILE_PATTERNS = TOKENIZER_FILE_PATTERNS + (r"generation_config\.json",)


def _copy_hf_files(src: str, dst: str) -> None:
    """Copy tokenizer and generation-config files (not weights, not config.json) from src to dst."""
    if not os.path.isdir(src):
        return
    names = [n for n in os.listdir(src) if any(re.fullmatch(p, n) for p in _HF_FILE_PATTERNS)]
    if names:
        os.makedirs(dst, exist_ok=True)
        for n in names:
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))


def _check_output_dir(save_dir: str) -> None:
    if os.path.isdir(save_dir) and any(n.endswith(".safetensors") for n in os.listdir(save_dir)):
        raise ConversionError(f"{save_dir} already holds safetensors weights: remove them or choose another --save-dir")


def _read_hf_config(load_dir: str) -> Dict[str, Any]:
    path = os.path.join(load_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"no config.json in {load_dir}")
    return _base_model_type(_json_object(path))


def _json_object(path: str) -> Dict[str, Any]:
    """A JSON file holding an object (config.json, megatron_ce.json); anything else -> ConversionError."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _base_model_type(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A CE export's config.json names its CE model_type (e.g. olmoe_ce): read it as the base family."""
    from megatron_ce.hf import base_model_type

    if "model_type" in cfg:
        cfg["model_type"] = base_model_type(cfg["model_type"])
    return cfg


CE_CONFIG_KEYS = ("moe_ce_num_compressed", "moe_ce_variant", "n_ce", "auto_map")


def _strip_ce(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The base model's HF config (CE fields are carried separately)."""
    return {k: v for k, v in cfg.items() if k not in CE_CONFIG_KEYS}


def _hf_ce_fields(cfg: Dict[str, Any]) -> Tuple[int, Optional[str]]:
    """(k_a, variant) an HF config declares: ours (moe_ce_*) or the reference's n_ce."""
    k = cfg.get("moe_ce_num_compressed")
    if k is None:
        k = cfg.get("n_ce")
    return int(k or 0), cfg.get("moe_ce_variant")


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
        reference's `ces` [n, 3, d]), else they are written as ones.
    dtype: 'auto' keeps each tensor's dtype; fp32/bf16/fp16 casts every tensor.
    """
    load_dir, save_dir = os.fspath(load_dir), os.fspath(save_dir)
    hf_cfg = _read_hf_config(load_dir)
    family = get_family(model_type or hf_cfg.get("model_type"))
    cast = _dtype(dtype)
    cfg_k, cfg_variant = _hf_ce_fields(hf_cfg)
    k_a = cfg_k if moe_ce_num_compressed is None else int(moe_ce_num_compressed)
    variant = moe_ce_variant or cfg_variant or "ia3"
    if cfg_variant and moe_ce_variant and cfg_variant != moe_ce_variant:
        raise ConversionError(
            f"--moe-ce-variant={moe_ce_variant} but the checkpoint's CE tables are {cfg_variant!r}"
        )
    # Strip CE fields: the mcore model config gets them from k_a / variant.
    base_cfg = _strip_ce(hf_cfg)

    reader = HFCheckpointReader(load_dir, family.fused_experts, family.hf_aliases)
    with world1_parallel_state():
        model = build_layout_model(family, base_cfg, k_a, variant)
        config = model.config
        layout = model_layout(model)
        del model
    ctx = family.context(config)
    mappings = list(family.table(config))
    ce_source = "none"
    if k_a > 0:
        probe_ours = family.ce.hf[variant]
        first = {r: p.format(layer=0) for r, p in probe_ours.items()}
        if all(n in reader for n in first.values()):
            ce_source = "checkpoint"
            mappings += [Direct(family.ce.megatron[variant][r], family.ce.hf[variant][r]) for r in probe_ours]
        elif family.ce.reference_probe and family.ce.reference_probe in reader:
            if variant != "ia3":
                raise ConversionError(
                    f"the reference CE tensor holds ia3 tables; --moe-ce-variant={variant} cannot use it"
                )
            ce_source = "reference"
            if ctx.moe_ffn_hidden_size > ctx.hidden_size:
                raise ConversionError(
                    f"the reference CE tensor `ces` is [n, 3, hidden={ctx.hidden_size}] and cannot hold "
                    f"theta_down of size ffn={ctx.moe_ffn_hidden_size} (the reference code needs ffn <= hidden)"
                )
            mappings += family.ce.reference()
        elif moe_ce_num_compressed is None:
            # config.json declares CE (k_a from the config, not from the flag): its tables must be there
            raise ConversionError(
                f"config.json declares {k_a} compressed experts but the checkpoint has no CE tables "
                f"(looked for {', '.join(first.values())}"
                + (f" or {family.ce.reference_probe}" if family.ce.reference_probe else "")
                + "); pass --moe-ce-num-compressed to create them as ones"
            )
        else:
            ce_source = "ones"
            mappings.append(Ones(*family.ce.megatron[variant].values()))
    bounds = expand(mappings, family.ranges(config))
    by_param = _index(bounds, layout)

    # ---- check the HF checkpoint against the table, all problems in one error
    mc_shapes = {n: p.shape for n, p in layout.params.items()}
    expected: Dict[str, Tuple[int, ...]] = {}
    for b in bounds:
        expected.update(b.hf_shapes(mc_shapes, ctx))
    ignore = [re.compile(p) for p in family.hf_ignore]
    present = [n for n in reader.keys() if not any(p.fullmatch(n) for p in ignore)]
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    misshaped = sorted(
        f"{n} {list(reader.shape(n))} (expected {list(expected[n])})"
        for n in set(expected) & set(present)
        if tuple(reader.shape(n)) != tuple(expected[n])
    )
    if missing or unexpected or misshaped:
        raise ConversionError(
            _problems_message(f"HF checkpoint {load_dir} does not match model_type {family.model_type}", missing, unexpected, misshaped)
        )

    # ---- dtypes per global key
    def source_dtype(b: Bound) -> torch.dtype:
        if not b.hf:
            return ref_dtype
        return reader.dtype(next(iter(b.hf.values())))

    first_hf = next(n for b in bounds for n in b.hf.values())
    ref_dtype = cast or reader.dtype(first_hf)  # for created tensors (CE ones) and the metadata
    key_dtypes: Dict[str, torch.dtype] = {}
    for name, p in layout.params.items():
        key_dtypes.setdefault(p.key, cast or source_dtype(by_param[name]))

    # ---- stream
    cache: Dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:
        if name in cache:
            return cache[name]
        b = by_param[name]
        cache.clear()
        if isinstance(b.mapping, Ones):
            out = b.mapping.make({r: mc_shapes[n] for r, n in b.megatron.items()}, key_dtypes[layout.params[name].key])
            out = {b.megatron[r]: t for r, t in out.items()}
        else:
            try:
                out = b.to_megatron({n: reader.get(n) for n in b.hf.values()}, ctx)
            except ValueError as e:
                raise ConversionError(f"{name}: {e}") from e
        for n, t in out.items():
            if tuple(t.shape) != tuple(mc_shapes[n]):
                raise ConversionError(f"{n}: converted shape {list(t.shape)} != model shape {list(mc_shapes[n])}")
        cache.update(out)
        return cache[name]

    groups = list(OrderedDict.fromkeys(_group(n) for n in layout.params))
    ckpt_dir = os.path.join(save_dir, RELEASE)
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ConversionError(f"{ckpt_dir} already exists and is not empty: remove it or choose another --save-dir")
    bar = _progress(len(groups), "HF -> Megatron", progress)

    def group_done(_g):
        cache.clear()
        reader.release()
        bar.update(1)

    write_dist_checkpoint(ckpt_dir, layout, key_dtypes, produce, _group, group_done)
    bar.close()
    meta = {
        "model_type": family.model_type,
        "hf_config": base_cfg,
        "moe_ce_num_compressed": k_a,
        "moe_ce_variant": variant,
        "ce_source": ce_source,
        "dtype": _dtype_name(ref_dtype),
        "format": "megatron-core torch_dist",
    }
    for d in (save_dir, ckpt_dir):
        with open(os.path.join(d, META_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    with open(os.path.join(save_dir, TRACKER_NAME), "w", encoding="utf-8") as f:
        f.write(RELEASE)
    _copy_hf_files(load_dir, os.path.join(save_dir, HF_FILES_DIR))
    return ckpt_dir


# ------------------------------------------------------------------------------------------
# Megatron -> HF
# ------------------------------------------------------------------------------------------


def resolve_checkpoint_dir(load_dir: str) -> str:
    """A dist checkpoint directory from a Megatron save dir (tracker file) or the directory itself."""
    load_dir = os.fspath(load_dir)
    if os.path.isfile(os.path.join(load_dir, ".metadata")):
        return load_dir
    tracker = os.path.join(load_dir, TRACKER_NAME)
    if os.path.isfile(tracker):
        try:
            with open(tracker, encoding="utf-8") as f:
                it = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConversionError(f"{tracker}: cannot read ({one_line(e)})") from e
        if it != RELEASE and not it.isdigit():
            raise ConversionError(f"{tracker}: expected '{RELEASE}' or an iteration number, found {it[:40]!r}")
        sub = RELEASE if it == RELEASE else f"iter_{int(it):07d}"
        path = os.path.join(load_dir, sub)
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ConversionError(f"{tracker}: points to {path}, which is not a dist checkpoint (no .metadata)")
        return path
    raise ConversionError(f"{load_dir} is neither a dist checkpoint (.metadata) nor a save dir ({TRACKER_NAME})")


def read_meta(ckpt_dir: str, load_dir: Optional[str] = None) -> Dict[str, Any]:
    for d in filter(None, (ckpt_dir, load_dir, os.path.dirname(os.path.abspath(ckpt_dir)))):
        path = os.path.join(d, META_NAME)
        if os.path.isfile(path):
            meta = _json_object(path)
            if not isinstance(meta.get("hf_config"), dict):
                raise ConversionError(f"{path}: no hf_config object (not written by convert_hf_to_megatron?)")
            return meta
    raise ConversionError(
        f"no {META_NAME} next to {ckpt_dir}: pass --hf-config (config.json of the model) and the CE flags"
    )


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
    progress: bool = True,
) -> List[str]:
    """Convert a megatron-core dist checkpoint (any TP/EP/PP) to HF safetensors + config.json.
    Returns the written shard names. The model description comes from megatron_ce.json, or from
    `hf_config` (a config.json path) plus the CE flags. `ce_format`: "native" (our `mlp.ce.*` tables and
    modeling code) or "reference" (the reference implementation's `mlp.ces` + `n_ce`)."""
    load_dir, save_dir = os.fspath(load_dir), os.fspath(save_dir)
    ckpt_dir = resolve_checkpoint_dir(load_dir)
    if hf_config is not None:
        if not os.path.isfile(hf_config):
            raise ConversionError(f"--hf-config {hf_config} does not exist")
        cfg = _base_model_type(_json_object(hf_config))
        k, v = _hf_ce_fields(cfg)
        meta = {"model_type": cfg.get("model_type"), "hf_config": cfg, "moe_ce_num_compressed": k, "moe_ce_variant": v or "ia3"}
    else:
        meta = read_meta(ckpt_dir, load_dir)
    family = get_family(model_type or meta.get("model_type"))
    base_cfg = _strip_ce(meta["hf_config"])
    k_a = int(meta.get("moe_ce_num_compressed") or 0) if moe_ce_num_compressed is None else int(moe_ce_num_compressed)
    variant = moe_ce_variant or meta.get("moe_ce_variant") or "ia3"
    cast = _dtype(dtype)

    ckpt = DistCheckpointReader(ckpt_dir)
    with world1_parallel_state():
        model = build_layout_model(family, base_cfg, k_a, variant)
        config = model.config
        layout = model_layout(model)
        del model
    ctx = family.context(config)
    mappings = list(family.table(config)) + ce_export_mappings(family, config, k_a, variant, ce_format)
    bounds = expand(mappings, family.ranges(config))
    _index(bounds, layout)

    # ---- check the checkpoint's model keys (a checkpoint written before the TE-layout keys holds
    # some tensors under their older names: read them from there)
    have = {k: ckpt.shape(k) for k in ckpt.tensors}
    _rename_keys(layout, legacy_key_renames(layout.keys(), have))
    want = layout.keys()
    model_prefixes = ("embedding.", "decoder.", "output_layer.")
    missing = sorted(set(want) - set(have))
    unexpected = sorted(k for k in set(have) - set(want) if k.startswith(model_prefixes))
    misshaped = sorted(
        f"{k} {list(have[k])} (expected {list(want[k])})" for k in set(want) & set(have) if tuple(have[k]) != tuple(want[k])
    )
    if missing or unexpected or misshaped:
        hint = []
        if any(".mlp.ce." in k for k in unexpected):
            hint.append("the checkpoint has CE tables: set moe_ce_num_compressed in megatron_ce.json or pass --moe-ce-num-compressed")
        if any(".mlp.ce." in k for k in missing):
            hint.append("the checkpoint has no (or other) CE tables than megatron_ce.json declares")
        raise ConversionError(
            _problems_message(f"Megatron checkpoint {ckpt_dir} does not match model_type {family.model_type}", missing, unexpected, misshaped, hint)
        )

    # ---- stream layer by layer
    groups: "OrderedDict[str, List[Bound]]" = OrderedDict()
    for b in bounds:
        g = _group(next(iter(b.megatron.values())))
        groups.setdefault(g, []).append(b)
    order = [g for g in ["embedding"] + [g for g in groups if g.startswith("layer ")] + ["final"] if g in groups]
    mc_shapes = {n: p.shape for n, p in layout.params.items()}
    plan = []
    for g in order:
        for b in groups[g]:
            dt = cast or ckpt.dtype(layout.params[next(iter(b.megatron.values()))].key)
            plan += [(name, shape, dt) for name, shape in b.hf_shapes(mc_shapes, ctx).items()]
    _check_output_dir(save_dir)
    writer = ShardedSafetensorsWriter(save_dir, plan, parse_size(max_shard_size))
    bar = _progress(len(groups), "Megatron -> HF", progress)
    for g in order:
        params = [n for b in groups[g] for n in b.megatron.values()]
        requests = [(layout.params[n].key, layout.params[n].base_offset, layout.params[n].region_sizes) for n in params]
        tensors = {n: t.reshape(layout.params[n].shape) for n, t in zip(params, ckpt.read(requests))}
        for b in groups[g]:
            for name, t in b.to_hf({n: tensors.pop(n) for n in b.megatron.values()}, ctx).items():
                writer.add(name, t.to(cast) if cast is not None else t)
        bar.update(1)
    shards = writer.close()
    bar.close()
    out_dtype = plan[0][2] if plan else None
    _copy_hf_files(os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), HF_FILES_DIR), save_dir)

    export = family.export_config(dict(base_cfg))
    export["architectures"] = list(family.architectures)
    export["model_type"] = family.model_type
    if out_dtype is not None:
        for k in [k for k in ("dtype", "torch_dtype") if k in export] or ["dtype"]:
            export[k] = _dtype_name(out_dtype)
    if k_a > 0:
        from megatron_ce.hf.export import install_ce_modeling, reference_config

        if ce_format == "reference":
            reference_config(export, k_a)
        else:  # CE modeling code beside the weights + auto_map/architectures (trust_remote_code loading)
            export["moe_ce_num_compressed"] = k_a
            export["moe_ce_variant"] = variant
            install_ce_modeling(save_dir, export, family.model_type)
    with open(os.path.join(save_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(export, f, indent=2, sort_keys=True)
    return shards
