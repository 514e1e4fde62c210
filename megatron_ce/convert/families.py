"""Model families known to the converter: one `Family` (with its declarative table) per HF model_type.

A new family is a new module with a `Family(...)` and a `register()` call, not new plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megatron_ce.convert.hf_io import FusedExperts
from megatron_ce.convert.mapping import Context, ConversionError, Mapping


@dataclass
class CETables:
    """How a family's CE tables are named, per variant (mcore param patterns <-> HF patterns)."""

    megatron: Dict[str, Dict[str, str]]  # variant -> role -> mcore pattern
    hf: Dict[str, Dict[str, str]]  # variant -> role -> HF pattern (our export names)
    reference: Optional[Callable[[], List[Mapping]]] = None  # import of the reference `ces` tensor
    reference_probe: Optional[str] = None  # HF name (layer 0) whose presence marks a reference ckpt


def moe_context(config) -> Context:
    """The Context of a GPT-style MoE TransformerConfig (what the typed mappings need)."""
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
    table: Callable[[Any], List[Mapping]]  # TransformerConfig -> base mappings (both directions)
    ce: CETables
    context: Callable[[Any], Context] = moe_context  # TransformerConfig -> Context
    ranges: Callable[[Any], Dict[str, int]] = layer_expert_ranges  # placeholder ranges
    fused_experts: Sequence[FusedExperts] = ()
    hf_aliases: Sequence[Tuple[str, str]] = ()  # (regex, replacement) applied to names on disk
    hf_ignore: Sequence[str] = ()  # regexes of HF tensors that are not weights (buffers)
    # HF config dict of the exported model (CE fields added by the engine)
    export_config: Callable[[Dict[str, Any]], Dict[str, Any]] = lambda cfg: dict(cfg)


_FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def _load_builtin():
    # Importing registers them.
    from megatron_ce.convert import olmoe  # noqa: F401
    from megatron_ce.convert import phimoe  # noqa: F401


def supported_model_types() -> List[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(model_type: Optional[str]) -> Family:
    _load_builtin()
    if model_type not in _FAMILIES:
        raise ConversionError(
            f"unknown model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))} "
            "(set it in config.json or pass --model-type)"
        )
    return _FAMILIES[model_type]
