"""How one CE MoE layer runs during calibration: its full top-k (the target) or top-k_m + CE.

The full top-k is `CEMoELayer.full_topk()` (megatron-core's own MoELayer path with all k selected experts
as main experts; the shared TransformerConfig is never touched, so other layers and models built from it
are unaffected).
"""

import contextlib
from typing import Dict, Iterator, List

import torch

from megatron_ce.ce.layer import CEMoELayer


class CalibrationError(ValueError):
    """A calibration input breaks a rule; the message is one line and names the argument or flag."""


def unwrap(model) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (a list of one model chunk is accepted)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise CalibrationError(f"calibration needs a single model chunk, got {len(model)} (virtual pipeline)")
        model = model[0]
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def ce_layers(model) -> Dict[int, CEMoELayer]:
    """{global 0-based layer index: CE MoE layer} of this rank's model, CE on (k_a > 0) only."""
    gpt = unwrap(model)
    out = {}
    for tlayer in gpt.decoder.layers:
        mlp = getattr(tlayer, "mlp", None)
        if isinstance(mlp, CEMoELayer) and mlp.ce is not None:
            out[tlayer.layer_number - 1] = mlp  # megatron-core numbers layers globally from 1
    return out


def ce_tables(layer: CEMoELayer) -> List[torch.nn.Parameter]:
    """The layer's theta tables in a fixed order (gate, up, down for ia3; hidden for hidden)."""
    return [p for _, p in sorted(layer.ce.named_parameters())]


@contextlib.contextmanager
def all_full_topk(layers) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.full_topk())
        yield


@contextlib.contextmanager
def theta_ones(layers) -> Iterator[None]:
    """theta = 1 in every given layer (top-k_m routing, docs/METHOD.md §1.7), restored afterwards."""
    saved = [(p, p.detach().clone()) for layer in layers for p in ce_tables(layer)]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.fill_(1.0)
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Deterministic routing (e.g. Phi-MoE's sparsemixer samples in training mode), no dropout."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
