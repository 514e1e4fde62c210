"""The model a conversion reads or writes: the family's mcore model at TP=PP=EP=1 on the meta device,
whose dist-checkpoint layout (keys, global shapes, chunks) comes from megatron-core itself; the check
that a family's table produces exactly its parameters; and the per-layer groups the converters stream."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Dict, Sequence, Tuple

import torch

from megatron_ce.convert.dist_io import ModelLayout, model_layout
from megatron_ce.models.registry import Family
from megatron_ce.convert.mapping import Bound, ConversionError


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
            moe_grouped_gemm=False,  # SequentialMLP: its dist-ckpt keys are what the grouped experts use too
        )


def layout_of(family: Family, hf_cfg: Dict[str, Any], k_a: int, variant: str) -> Tuple[Any, ModelLayout]:
    """(mcore TransformerConfig, dist-checkpoint layout) of the family's model; the meta model is dropped."""
    with world1_parallel_state():
        model = build_layout_model(family, hf_cfg, k_a, variant)
        return model.config, model_layout(model)


def index_bounds(bounds: Sequence[Bound], layout: ModelLayout) -> Dict[str, Bound]:
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


def group_of(name: str) -> str:
    """The streaming group of an mcore parameter: 'embedding', 'layer N' or 'final'."""
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    return f"layer {int(m.group(1))}" if m else ("final" if not name.startswith("embedding.") else "embedding")


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)
