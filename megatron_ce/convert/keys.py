"""Dist-checkpoint keys of older checkpoints, read under today's keys (one rule, used by the converter
and the trainer's loader).

Up to this version the local spec stored an MoE layer's pre-MLP norm under mcore's local-spec key
`...mlp.linear_fc1.layer_norm_{weight,bias}`; now every spec (local and Transformer-Engine) stores it
under the TE key `...pre_mlp_layernorm.{weight,bias}` (megatron_ce.ce.spec.with_te_checkpoint_keys).
A key the model wants that the checkpoint lacks, whose old name the checkpoint has and the model does
not use itself, is read from the old name: same tensor, same global shape.
"""

from __future__ import annotations

import re
from typing import Collection, Dict, Iterable, Optional

_NEW = re.compile(r"(^|.*\.)pre_mlp_layernorm\.(weight|bias)$")


def legacy_key(key: str) -> Optional[str]:
    """The name an older checkpoint gave `key`, or None if it had the same name."""
    m = _NEW.match(key)
    return f"{m.group(1)}mlp.linear_fc1.layer_norm_{m.group(2)}" if m else None


def legacy_key_renames(wanted: Iterable[str], present: Collection[str]) -> Dict[str, str]:
    """{key the model wants: the older name to read it from} for the wanted keys missing from a
    checkpoint (`present`: its tensor keys) that it holds under their older name."""
    wanted = set(wanted)
    out = {}
    for key in wanted:
        old = legacy_key(key)
        if key not in present and old is not None and old in present and old not in wanted:
            out[key] = old
    return out


def read_legacy_keys(sharded_state_dict, present: Collection[str]) -> Dict[str, str]:
    """Point the ShardedTensors of a model's sharded state dict whose key a checkpoint (tensor keys
    `present`) holds under its older name at that name, in place, before `dist_checkpointing.load`.
    Returns the renames made ({} for a checkpoint with today's keys)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tensors = [v for v in nested_values(sharded_state_dict) if isinstance(v, ShardedTensor)]
    renames = legacy_key_renames((t.key for t in tensors), present)
    for t in tensors:
        if t.key in renames:
            t.key = renames[t.key]
    return renames
