"""megatron-core log noise that our layers cause on purpose, silenced in one place.

TransformerLayer logs "Unknown MLP type ... Using default kwargs" once per layer for any MoE class other
than MoELayer itself (our CEMoELayer, see docs/ARCHITECTURE.md). It then builds the layer without an
explicit pg_collection and the layer takes the default process groups, which is what we want.
"""

from __future__ import annotations

import contextlib
import logging

_LAYER_LOG = "megatron.core.transformer.transformer_layer"


class DropUnknownMlpType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


def silence_unknown_mlp_type() -> None:
    """For the whole process (the trainer)."""
    logging.getLogger(_LAYER_LOG).addFilter(DropUnknownMlpType())


@contextlib.contextmanager
def quiet_layer_build():
    """Only while building (the converters, which may run inside a caller's process)."""
    log, f = logging.getLogger(_LAYER_LOG), DropUnknownMlpType()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)
