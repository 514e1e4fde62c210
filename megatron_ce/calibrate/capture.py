"""Capture of one MoE layer's inputs and full top-k outputs over a set of batches.

Only one layer is captured at a time (its input and target per batch), so memory holds one layer's
activations. The model runs up to that layer and stops there: a forward pre-hook records the layer's
call and raises, which every rank does at the same layer, so no collective is left half done.
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List

import torch

from megatron_ce.calibrate.modes import CalibrationError


@dataclass
class LayerBatch:
    """One batch at one MoE layer: its input, the call's keyword arguments, the full top-k output."""

    x: torch.Tensor
    kwargs: Dict[str, Any]
    target: torch.Tensor


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the captured layer."""


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def run_model(model, batch: Dict[str, torch.Tensor], **kwargs):
    """Causal forward of a {"tokens", "position_ids"} batch (no attention mask: causal mask type)."""
    device = model_device(model)
    tokens = batch["tokens"].to(device)
    position_ids = batch["position_ids"].to(device)
    return model(tokens, position_ids, None, **kwargs)


def capture_inputs(model, layer, batches: Iterable[Dict[str, torch.Tensor]]) -> List[LayerBatch]:
    """Inputs of `layer` for each batch, with the model as it is now (earlier layers included)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach().clone(), dict(kwargs)))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    run_model(model, batch)
                except _Stop:
                    pass
                if len(calls) != i + 1:
                    raise CalibrationError(f"batch {i} never reached MoE layer {layer.layer_number - 1}")
    finally:
        handle.remove()
    return [LayerBatch(x, kw, full_topk_output(layer, x, kw)) for x, kw in calls]


def full_topk_output(layer, x: torch.Tensor, kwargs: Dict[str, Any]) -> torch.Tensor:
    """The layer's output with its full top-k routing: the calibration target."""
    with torch.no_grad(), layer.full_topk():
        return layer_output(layer, x, kwargs).detach()


def layer_output(layer, x: torch.Tensor, kwargs: Dict[str, Any]) -> torch.Tensor:
    """The MoE layer's output tensor (its bias, None for our families, is not part of the fit)."""
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out
