"""Calibration of the compressed-expert tables theta before SFT (docs/METHOD.md, "Calibrating theta").

    from megatron_ce.calibrate import calibrate_ce_model
    result = calibrate_ce_model(model, batches, layers=None, steps=200, lr=1e-2, holdout_batches=None,
                                progress=False, writer=None)
    print(result.table())

Modules: `modes` (full top-k / theta = 1 views of a CE layer), `capture` (a layer's inputs and
targets), `fit` (the per-layer fit), `metrics` and `report` (errors, similarity, losses, table),
`dist` (reductions that match training's treatment of theta), `api` (the loop over layers).
"""

from megatron_ce.calibrate.api import calibrate_ce_model, calibrate_layer
from megatron_ce.calibrate.modes import CalibrationError, ce_layers, theta_ones
from megatron_ce.calibrate.report import CalibrationResult, LayerRecord

__all__ = [
    "calibrate_ce_model",
    "calibrate_layer",
    "CalibrationError",
    "CalibrationResult",
    "LayerRecord",
    "ce_layers",
    "theta_ones",
]
