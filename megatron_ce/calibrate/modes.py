"""How one CE MoE layer runs during calibration: its full top-k (the target) or top-k_m + CE.

`full_topk(layer)` runs a CE layer through megatron-core's own MoELayer path with all k selected
experts as main experts: the CE layer falls back to its parent's route/preprocess/expert calls when it
has no tables (`layer.ce is None`, the k_a = 0 path, identical to MoELayer by docs/METHOD.md §1.7), and
its token dispatcher -- which owns a private config copy sized for the k_m dispatched selections
(CEMoELayer._dispatch_main_only) -- is given back the full top-k for the duration. The shared
TransformerConfig is never touched, so other layers and other models built from it are unaffected.
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
def full_topk(layer: CEMoELayer) -> Iterator[None]:
    """Run `layer` as the unmodified top-k MoE layer (all k experts main, no compressed experts)."""
    ce, td = layer.ce, layer.token_dispatcher
    k = layer.config.moe_router_topk
    saved_cfg_k = td.config.moe_router_topk
    has_router_topk = hasattr(td, "router_topk")
    saved_td_k = td.router_topk if has_router_topk else None
    layer.ce = None
    td.config.moe_router_topk = k
    if has_router_topk:
        td.router_topk = k
    try:
        yield
    finally:
        layer.ce = ce
        td.config.moe_router_topk = saved_cfg_k
        if has_router_topk:
            td.router_topk = saved_td_k


@contextlib.contextmanager
def all_full_topk(layers) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(full_topk(layer))
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
