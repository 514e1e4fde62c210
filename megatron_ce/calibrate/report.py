"""Calibration records, the per-layer table and TensorBoard scalars."""

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from megatron_ce.runtime.parallel import is_rank0

LOSS_LABELS = {
    "topk": "full top-k",
    "topk_m": "top-k_m (theta = 1)",
    "topk_m_ce_before": "top-k_m + CE (theta before)",
    "topk_m_ce_calibrated": "top-k_m + CE (calibrated)",
}


@dataclass
class LayerRecord:
    """One calibrated layer. rel_err_*: ||y - y_topk|| / ||y_topk|| of the layer's output against its
    full top-k output, on the held-out batches (the calibration batches without holdout):
    topk_m = theta = 1, before = theta as given, fitted = after the fit, calibrated = the theta kept
    (the fitted one, or the one before when the fit was worse on held-out data: reverted).
    expert_cosine: mean pairwise cosine of the flattened expert weights. theta_*: the kept theta."""

    layer: int
    rel_err_topk_m: float
    rel_err_before: float
    rel_err_calibrated: float
    expert_cosine: float
    rel_err_fitted: Optional[float] = None
    reverted: bool = False
    theta_max_dev: Optional[float] = None  # max |theta - 1| of the kept theta
    theta_mean: Optional[float] = None
    fit_mse_first: Optional[float] = None
    fit_mse_last: Optional[float] = None

    @property
    def gain(self) -> float:
        """Error after / error with theta = 1 (< 1: calibration helps)."""
        return self.rel_err_calibrated / self.rel_err_topk_m if self.rel_err_topk_m > 0 else 1.0


@dataclass
class CalibrationResult:
    steps: int
    lr: float
    error_data: str  # "holdout" or "calibration": where the rel_err_* were measured
    layers: List[LayerRecord] = field(default_factory=list)
    losses: Dict[str, float] = field(default_factory=dict)  # held-out LM losses (LOSS_LABELS keys)

    def to_dict(self) -> Dict:
        return {"steps": self.steps, "lr": self.lr, "error_data": self.error_data,
                "layers": [dict(asdict(r), gain=r.gain) for r in self.layers], "heldout_loss": dict(self.losses)}

    def table(self) -> str:
        """The per-layer table and the held-out losses as text."""
        lines = [f"{'layer':>5} {'err theta=1':>12} {'err before':>11} {'err fitted':>11} {'err kept':>9} "
                 f"{'ratio':>6} {'expert cos':>10}   (relative output error of the MoE layer vs its full "
                 f"top-k, {self.error_data} data; ratio = kept / theta=1)"]
        for r in self.layers:
            fitted = f"{r.rel_err_fitted:>11.4f}" if r.rel_err_fitted is not None else f"{'-':>11}"
            lines.append(f"{r.layer:>5} {r.rel_err_topk_m:>12.4f} {r.rel_err_before:>11.4f} {fitted} "
                         f"{r.rel_err_calibrated:>9.4f} {r.gain:>6.3f} {r.expert_cosine:>10.4f}"
                         + ("   reverted (fit worse on held-out data)" if r.reverted else ""))
        for key, label in LOSS_LABELS.items():
            if key in self.losses:
                lines.append(f"held-out LM loss, {label}: {self.losses[key]:.4f}")
        return "\n".join(lines)


def log_layer(writer, r: LayerRecord) -> None:
    if writer is None or not is_rank0():
        return
    for name in ("rel_err_topk_m", "rel_err_before", "rel_err_calibrated", "expert_cosine"):
        writer.add_scalar(f"calibration/{name}", getattr(r, name), r.layer)


def log_losses(writer, losses: Dict[str, float]) -> None:
    if writer is None or not is_rank0():
        return
    for key, value in losses.items():
        writer.add_scalar(f"calibration/heldout_loss/{key}", value, 0)
    writer.flush()
