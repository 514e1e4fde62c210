"""The variants of the reproduction and the recovery rows built from them.

Two families, each with a reference (all k experts run), a baseline (k_m = k/2 experts run) and CE rows
(router top-k, k_a = k/2 compressed experts, k_m run):
  k_a=2 (OLMoE's top-8 -> top-4 + 4 CE, scaled): top-4 / top-2 / top-2 + 2 CE
  k_a=1 (Phi-MoE's top-2 -> top-1 + 1 CE):         top-2 / top-1 / top-1 + 1 CE
Grid rows (theta lr multiplier, calibration size) are selected per pretraining seed on the validation
problems; the selected one is reported under the group's name (`selected` below).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class Variant:
    name: str
    topk: int  # router top-k
    k_a: int = 0  # compressed experts (0: megatron-core's stock MoE layer)
    ce: str = "ia3"  # CE variant (docs/METHOD.md §1.4)
    lr_mult: float = 1.0  # theta learning rate = lr x lr_mult
    calib: int = 0  # calibration batches before SFT (0: theta starts at ones)
    tau: Optional[float] = None  # adaptive split (--moe-ce-split mass)
    tied: bool = False  # control: one theta row shared by all experts of a layer (model.tie_theta_rows)
    group: Optional[str] = None  # grid group selected on validation

    @property
    def experts_run(self) -> int:
        return self.topk - self.k_a

    def as_dict(self) -> Dict:
        return asdict(self)


LR_GROUP = "top-2+CE lr-mult (val)"
CAL_GROUP = "top-2+calCE (val)"
TIED_GROUP = "top-2+tied θ lr-mult (val)"  # control for LR_GROUP: the aux experts' identity removed
CAL_LR_GROUP = "top-2+calCE lr-mult (val)"  # calibrated start, then SFT with the raised theta lr


def variants(lr_mults: List[float], calib_sizes: List[int], taus: List[float],
             calibration: bool) -> List[Variant]:
    out = [Variant("top-4", 4), Variant("top-2", 2), Variant("top-2+CE", 4, 2),
           Variant("top-2+CE hidden", 4, 2, ce="hidden"), Variant("top-1", 1), Variant("top-1+CE", 2, 1)]
    out += [Variant(f"top-2+CE lr×{m:g}", 4, 2, lr_mult=m, group=LR_GROUP) for m in lr_mults]
    out += [Variant(f"top-2+tied θ lr×{m:g}", 4, 2, lr_mult=m, tied=True, group=TIED_GROUP) for m in lr_mults]
    if calibration:
        out += [Variant(f"top-2+calCE n={n}", 4, 2, calib=n, group=CAL_GROUP) for n in calib_sizes]
        out += [Variant(f"top-2+calCE n={n} lr×{m:g}", 4, 2, lr_mult=m, calib=n, group=CAL_LR_GROUP)
                for n in calib_sizes for m in lr_mults]
    out += [Variant(f"mass tau={t:g}", 4, 3, tau=t) for t in taus]
    return out


# recovery rows: (CE row, reference, baseline)
def recovery_rows(calibration: bool) -> List[tuple]:
    rows = [("top-2+CE", "top-4", "top-2"), ("top-2+CE hidden", "top-4", "top-2"),
            (LR_GROUP, "top-4", "top-2"), (TIED_GROUP, "top-4", "top-2")]
    if calibration:
        rows += [(CAL_GROUP, "top-4", "top-2"), (CAL_LR_GROUP, "top-4", "top-2")]
    rows.append(("top-1+CE", "top-2", "top-1"))
    return rows


def select(results: Dict[str, Dict], members: List[str]) -> str:
    """The grid member with the best validation exact match (ties: lower validation NLL, then order)."""
    return min(members, key=lambda n: (-results[n]["val_acc"], results[n]["val_nll"], members.index(n)))
