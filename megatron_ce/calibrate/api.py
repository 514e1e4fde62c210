"""calibrate_ce_model: fit every CE layer's theta so that top-k_m + CE stands in for the full top-k.

Layers are calibrated in order, one at a time. Layer L's inputs are captured from the model as it
will be deployed -- layers before L already calibrated and running top-k_m + CE -- not from the
full-top-k model: those are the inputs L sees after calibration (and in SFT), so the fit spends
theta's few degrees of freedom on that distribution. The target is the full top-k output of layer L
on the same inputs, so each fit asks only "stand in for this layer's dropped experts"; the
remaining error of earlier layers is not pushed onto L's theta, which could not undo it anyway.
"""

from typing import Iterable, List, Optional, Set

import torch

from megatron_ce.calibrate.capture import capture_inputs
from megatron_ce.calibrate.dist import check_layout, check_same_count
from megatron_ce.calibrate.fit import fit_layer
from megatron_ce.calibrate.metrics import expert_similarity, lm_loss, relative_error
from megatron_ce.calibrate.modes import (
    CalibrationError,
    all_full_topk,
    ce_layers,
    ce_tables,
    eval_mode,
    theta_ones,
    unwrap,
)
from megatron_ce.calibrate.report import CalibrationResult, LayerRecord, log_layer, log_losses
from megatron_ce.runtime.parallel import is_rank0


def calibrate_ce_model(model, batches: Iterable, *, layers: Optional[Set[int]] = None, steps: int = 200,
                       lr: float = 1e-2, holdout_batches: Optional[Iterable] = None, progress: bool = False,
                       writer=None, keep_if_worse: bool = False) -> CalibrationResult:
    """Calibrate theta in place; see the module docstring and docs/METHOD.md ("Calibrating theta").

    batches / holdout_batches: this rank's {"tokens", "position_ids"} batches (DP ranks: their own
    shard; TP ranks of one replica: the same batches). layers: global 0-based indices of MoE layers to
    calibrate (None: all CE layers); the others keep their theta exactly."""
    gpt = unwrap(model)
    check_layout()
    all_layers = ce_layers(gpt)
    chosen = _chosen_layers(all_layers, layers)
    batches = list(batches)
    holdout = list(holdout_batches) if holdout_batches is not None else None
    if not batches:
        raise CalibrationError("calibration needs at least one batch (--num-samples)")
    check_same_count(len(batches), "batches")
    check_same_count(len(holdout or []), "holdout_batches")
    if steps < 0:
        raise CalibrationError(f"--calib-steps={steps} must be >= 0")
    result = CalibrationResult(steps=steps, lr=lr, error_data="holdout" if holdout else "calibration")
    with eval_mode(gpt):
        if holdout:
            result.losses.update(_reference_losses(gpt, all_layers, holdout))
        bar = _progress_bar(progress, len(chosen) * steps)
        try:
            for index in chosen:
                record = calibrate_layer(gpt, index, all_layers[index], batches, holdout, steps, lr, bar, writer,
                                         revert_if_worse=not keep_if_worse)
                result.layers.append(record)
        finally:
            if bar is not None:
                bar.close()
        if holdout:
            result.losses["topk_m_ce_calibrated"] = lm_loss(gpt, holdout)
    log_losses(writer, result.losses)
    return result


def _chosen_layers(all_layers, layers) -> List[int]:
    if not all_layers:
        raise CalibrationError("the model has no CE layers (--moe-ce-num-compressed must be > 0)")
    if layers is None:
        return sorted(all_layers)
    unknown = sorted(set(layers) - set(all_layers))
    if unknown:
        raise CalibrationError(f"--calib-layers: {unknown} are not CE MoE layers (those are {sorted(all_layers)})")
    return sorted(layers)


def _reference_losses(gpt, all_layers, holdout):
    layers = list(all_layers.values())
    with all_full_topk(layers):
        topk = lm_loss(gpt, holdout)
    with theta_ones(layers):
        topk_m = lm_loss(gpt, holdout)
    return {"topk": topk, "topk_m": topk_m, "topk_m_ce_before": lm_loss(gpt, holdout)}


def calibrate_layer(gpt, index, layer, batches, holdout, steps, lr, bar=None, writer=None,
                    revert_if_worse: bool = True) -> LayerRecord:
    """Capture, measure, fit and measure again one layer (the layers before it as they are now)."""
    data = capture_inputs(gpt, layer, batches)
    check = capture_inputs(gpt, layer, holdout) if holdout else data
    with theta_ones([layer]):
        err_ones = relative_error(layer, check)
    err_before = relative_error(layer, check)

    def on_step(step, loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(layer=index, mse=f"{loss:.3g}")
        if writer is not None and is_rank0():
            writer.add_scalar(f"calibration/layer{index}/mse", loss, step)

    saved = [t.detach().clone() for t in ce_tables(layer)]
    fit = fit_layer(layer, data, steps, lr, on_step)
    err_fitted = relative_error(layer, check)
    reverted = bool(holdout) and revert_if_worse and err_fitted > err_before
    if reverted:
        with torch.no_grad():
            for t, value in zip(ce_tables(layer), saved):
                t.copy_(value)
    record = LayerRecord(layer=index, rel_err_topk_m=err_ones, rel_err_before=err_before,
                         rel_err_calibrated=err_before if reverted else err_fitted, rel_err_fitted=err_fitted,
                         reverted=reverted, expert_cosine=expert_similarity(layer),
                         fit_mse_first=fit[0] if fit else None, fit_mse_last=fit[-1] if fit else None,
                         **theta_stats(layer))
    del data, check
    log_layer(writer, record)
    return record


def theta_stats(layer) -> dict:
    """How far theta moved from ones: max |theta - 1| and mean theta over the layer's tables."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in ce_tables(layer)])
    return {"theta_max_dev": float((flat - 1).abs().max()), "theta_mean": float(flat.mean())}


def _progress_bar(progress: bool, total: int):
    if not (progress and is_rank0()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="calibrating theta", unit="step")


__all__ = ["calibrate_ce_model", "calibrate_layer"]
