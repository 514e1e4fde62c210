"""The model families, one package per HF model_type under megatron_ce/models/ (docs/ARCHITECTURE.md).

Everything that depends on the family reads it here: the trainer and the converter (`get_family`: the
builder and the conversion table), the HF export (`ce_export`: the CE modeling code an export ships),
the paper tools, launch/plan.py and the benchmark (`presets`: released configs and shapes).

Standard library only: launch/plan.py imports this on login nodes without torch. `presets` and
`ce_export` of a built-in family read its torch-free modules (`<package>.presets`, `<package>.export`);
`get_family` imports `<package>.family`, which declares the whole `Family` and needs torch.
A new family is a new package with those modules and one line in `BUILTIN_PACKAGES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch-side types, for annotations only
    from megatron_ce.convert.hf_io import FusedExperts
    from megatron_ce.convert.mapping import Context, Mapping

BUILTIN_PACKAGES: Dict[str, str] = {
    "olmoe": "megatron_ce.models.olmoe",
    "phimoe": "megatron_ce.models.phimoe",
}


@dataclass
class CETables:
    """How a family's CE tables are named, per variant (mcore param patterns <-> HF patterns)."""

    megatron: Dict[str, Dict[str, str]]  # variant -> role -> mcore pattern
    hf: Dict[str, Dict[str, str]]  # variant -> role -> HF pattern (our export names)
    reference: Optional[Callable[[], List["Mapping"]]] = None  # import of the reference `ces` tensor
    reference_probe: Optional[str] = None  # HF name (layer 0) whose presence marks a reference ckpt


@dataclass(frozen=True)
class CEExport:
    """The HF modeling code (megatron_ce/hf/) an export with CE tables ships and registers via auto_map."""

    model_type: str  # model_type of the exported config, e.g. "olmoe_ce"
    files: Tuple[str, ...]  # copied from megatron_ce/hf/ into the export
    architectures: Tuple[str, ...]
    auto_map: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Presets:
    """A family's fixed configurations."""

    paper_hf_config: Dict[str, Any]  # the released model's HF config (paper tools; no download)
    launch: Dict[str, Any]  # HF config fields launch/plan.py reads, plus its `qk_norm` (bool)
    bench_shape: Dict[str, int]  # tools/bench_moe_layer.py: hidden d, expert ffn, n experts, top-k
    smoke_shape: Dict[str, int]  # the same code path at a CPU-second size (--smoke)
    experts_field: str = "num_experts"  # the HF config key holding the number of experts
    # What the paper states for the released model (arXiv 2503.00634): router topk, k_a, active
    # parameters base / CE, reduction %, its non-MoE approximation, latency_s (top-k, top-k/2, top-k/2+CE)
    paper_figures: Dict[str, Any] = field(default_factory=dict)


def moe_context(config) -> "Context":
    """The Context of a GPT-style MoE TransformerConfig (what the typed mappings need)."""
    from megatron_ce.convert.mapping import Context

    return Context(
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        hidden_size=config.hidden_size,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        num_experts=config.num_moe_experts,
    )


def layer_expert_ranges(config) -> Dict[str, int]:
    """Values of the {layer} and {expert} placeholders in the name tables."""
    return {"layer": config.num_layers, "expert": config.num_moe_experts}


@dataclass
class Family:
    model_type: str
    architectures: Sequence[str]
    # hf_config dict, k_a, variant, config overrides -> mcore model (built in the current parallel state)
    build_model: Callable[..., Any]
    table: Callable[[Any], List["Mapping"]]  # TransformerConfig -> base mappings (both directions)
    ce: CETables
    context: Callable[[Any], "Context"] = moe_context  # TransformerConfig -> Context
    ranges: Callable[[Any], Dict[str, int]] = layer_expert_ranges  # placeholder ranges
    fused_experts: Sequence["FusedExperts"] = ()
    hf_aliases: Sequence[Tuple[str, str]] = ()  # (regex, replacement) applied to names on disk
    hf_ignore: Sequence[str] = ()  # regexes of HF tensors that are not weights (buffers)
    # HF config dict of the exported model (CE fields added by the engine)
    export_config: Callable[[Dict[str, Any]], Dict[str, Any]] = lambda cfg: dict(cfg)
    ce_export: Optional[CEExport] = None  # None: CE exports load only as the stock model (a warning)
    presets: Optional[Presets] = None
    # HF config dict -> (random-init HF model whose MoE blocks are our HF CE blocks, those blocks): the
    # paper latency tool (megatron_ce/paper/latency.py) times it
    build_hf_ce_model: Optional[Callable[[Dict[str, Any]], Tuple[Any, List[Any]]]] = None


_FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def _load_builtin():
    for package in BUILTIN_PACKAGES.values():
        importlib.import_module(package + ".family")  # importing registers it


def builtin_model_types() -> List[str]:
    """The built-in families, without importing them (torch-free)."""
    return sorted(BUILTIN_PACKAGES)


def supported_model_types() -> List[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(model_type: Optional[str]) -> Family:
    _load_builtin()
    if model_type not in _FAMILIES:
        from megatron_ce.convert.mapping import ConversionError

        raise ConversionError(
            f"unknown model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))} "
            "(set it in config.json or pass --model-type)"
        )
    return _FAMILIES[model_type]


def _declared(model_type: str, module: str, name: str, attr: str):
    """`attr` of a registered family, else `name` of a built-in family's torch-free `module`."""
    if model_type in _FAMILIES:
        return getattr(_FAMILIES[model_type], attr)
    if model_type in BUILTIN_PACKAGES:
        return getattr(importlib.import_module(f"{BUILTIN_PACKAGES[model_type]}.{module}"), name)
    known = sorted(set(BUILTIN_PACKAGES) | set(_FAMILIES))
    raise KeyError(f"unknown model family {model_type!r}; known: {', '.join(known)}")


def presets(model_type: str) -> Presets:
    """The family's presets (torch-free for the built-in families)."""
    return _declared(model_type, "presets", "PRESETS", "presets")


def ce_export(model_type: str) -> Optional[CEExport]:
    """The CE modeling code of the family's exports, or None (torch-free for the built-in families)."""
    return _declared(model_type, "export", "CE_EXPORT", "ce_export")


def ce_exports() -> Dict[str, CEExport]:
    """{base model_type: CEExport} of every known family that has HF CE modeling code."""
    types = sorted(set(BUILTIN_PACKAGES) | set(_FAMILIES))
    return {mt: e for mt in types if (e := ce_export(mt)) is not None}


def base_model_type(model_type: Optional[str]) -> Optional[str]:
    """The family of a CE export's model_type ("olmoe_ce" -> "olmoe"); other names unchanged."""
    for base, export in ce_exports().items():
        if model_type == export.model_type:
            return base
    return model_type
