"""Training metrics: routing statistics from forward hooks on the MoE routers, theta statistics, the
TensorBoard writer and the one-line log.

Routing statistics (accumulated over the training micro-batches of a log interval, summed over all
ranks; eval forwards are not counted):
- expert load: tokens per *main* expert and layer (the experts that run); min / max / CV (std/mean);
- aux routing mass: share of the routed (top-k) router probability that goes to compressed experts;
- lb_loss: the switch load-balancing loss of the full top-k selection, E * sum_i f_i * P_i (1.0 when
  perfectly balanced), whether or not it is trained; aux_loss = --moe-aux-loss-coeff * lb_loss is
  what training adds to the objective (0 by default).
A hook on a CE router sees its plain TopKRouter output (probs, routing_map over the full top-k) and
splits it with the router's own `split_main_aux`, so the numbers are exactly what the layer uses.

Everything is reduced over the whole world with one all-reduce per log line: each pipeline stage
fills its own layers' rows, and tensor/data-parallel ranks add their own tokens (MoE with TP always
runs with SP, so TP ranks route distinct tokens).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F


def moe_layers(gpt_model) -> Dict[int, torch.nn.Module]:
    """{global layer number (1-based): MoELayer} of this pipeline stage."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return {m.layer_number: m for m in gpt_model.modules() if isinstance(m, MoELayer)}


class RoutingStats:
    """Router statistics from forward hooks. Training (default) counts the forwards that build the
    graph; `inference=True` counts forwards run under no_grad (measurement tools)."""

    def __init__(self, gpt_model, num_layers: int, num_experts: int, inference: bool = False):
        self.L, self.E = num_layers, num_experts
        self.enabled = True
        # Full activation recompute runs each layer's forward twice: first under no_grad, then again
        # with grad in the backward pass. Count the first one only.
        recompute = getattr(gpt_model.config, "recompute_granularity", None) == "full"
        self.count_with_grad = not inference and not recompute
        self.layers = moe_layers(gpt_model)
        self._reset()
        self._handles = [layer.router.register_forward_hook(self._hook(n))
                         for n, layer in self.layers.items()]

    def close(self):
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _reset(self):
        L, E = self.L, self.E
        self.main_load = torch.zeros(L, E, dtype=torch.float64)
        self.topk_load = torch.zeros(L, E, dtype=torch.float64)
        self.score_sum = torch.zeros(L, E, dtype=torch.float64)
        self.aux_mass = torch.zeros(L, dtype=torch.float64)
        self.tokens = torch.zeros(L, dtype=torch.float64)
        # tokens with m main experts, m = 0..E (varies per token under --moe-ce-split mass)
        self.n_main_hist = torch.zeros(L, E + 1, dtype=torch.float64)

    def _hook(self, layer_number: int):
        def hook(router, inputs, output):
            if not self.enabled or torch.is_grad_enabled() != self.count_with_grad:
                return
            with torch.no_grad():
                probs, routing_map = output
                i = layer_number - 1
                T = routing_map.shape[0]
                self.tokens[i] += T
                self.topk_load[i] += routing_map.sum(0).double().cpu()
                if getattr(router, "ce_num_compressed", 0) > 0:
                    _, main_map, _, _ = router.split_main_aux(probs, routing_map)
                    routed = (probs * routing_map).sum(-1).double()
                    aux = routed - (probs * main_map).sum(-1).double()  # the top-k mass not run
                    self.aux_mass[i] += (aux / routed.clamp_min(1e-30)).sum().cpu()
                else:
                    main_map = routing_map
                self.main_load[i] += main_map.sum(0).double().cpu()
                n_main = main_map.sum(-1)
                self.n_main_hist[i] += torch.bincount(n_main, minlength=self.E + 1).double().cpu()
                # Full softmax scores for the load-balancing statistic (the router's probs are
                # only defined on the selected experts).
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                scores = torch.softmax(F.linear(x.float(), router.weight.float()), dim=-1)
                self.score_sum[i] += scores.sum(0).double().cpu()
        return hook

    def reduce_and_reset(self, topk: int, aux_coeff: float) -> Dict[str, List[float]]:
        """Collective (all ranks). Per-layer lists (MoE layers only), then resets the counters."""
        flat = torch.cat([self.main_load.flatten(), self.topk_load.flatten(), self.score_sum.flatten(),
                          self.aux_mass, self.tokens, self.n_main_hist.flatten()])
        torch.distributed.all_reduce(flat)
        L, E = self.L, self.E
        main, topk_load, scores, aux_mass, tokens, hist = flat.split(
            [L * E, L * E, L * E, L, L, L * (E + 1)])
        hist = hist.view(L, E + 1)
        main, topk_load, scores = main.view(L, E), topk_load.view(L, E), scores.view(L, E)
        self._reset()
        layers = [i for i in range(L) if tokens[i] > 0]
        out: Dict[str, List[float]] = {"layer": [i + 1 for i in layers]}
        for i in layers:
            load = main[i]
            mean = load.mean()
            out.setdefault("load_min", []).append(float(load.min()))
            out.setdefault("load_max", []).append(float(load.max()))
            out.setdefault("load_cv", []).append(float(load.std(unbiased=False) / mean) if mean > 0 else 0.0)
            out.setdefault("aux_mass", []).append(float(aux_mass[i] / tokens[i]))
            counts = hist[i]
            out.setdefault("main_per_token", []).append(
                float((counts * torch.arange(E + 1, dtype=counts.dtype)).sum() / counts.sum()))
            out.setdefault("main_per_token_hist", []).append(counts.tolist())
            T = tokens[i]
            lb = float(E * (topk_load[i] / (T * topk) * scores[i] / T).sum())
            out.setdefault("lb_loss", []).append(lb)
            out.setdefault("aux_loss", []).append(aux_coeff * lb)
        return out


# ----------------------------------------------------------------------------------------------
# theta statistics (from the fp32 master weights: what the optimizer updates)
# ----------------------------------------------------------------------------------------------


def _master_map(optimizer) -> Dict[int, torch.Tensor]:
    """id(model param) -> its fp32 master tensor, for the non-distributed mixed-precision optimizer."""
    out = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for mg, fg in zip(getattr(sub, "float16_groups", []), getattr(sub, "fp32_from_float16_groups", [])):
            for m, f in zip(mg, fg):
                out[id(m)] = f
    return out


def _dist_master(optimizer, param: torch.Tensor) -> Optional[torch.Tensor]:
    """Full fp32 master of a 16-bit param under the distributed optimizer (collective over its DP group)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        gmap = getattr(sub, "model_param_gbuf_map", None)
        if gmap is None or param not in gmap:
            continue
        full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        for mg, sg in zip(sub.model_float16_groups, sub.shard_fp32_from_float16_groups):
            for m, s in zip(mg, sg):
                if m is param:
                    r = sub._get_model_param_range_map(param)["param"]
                    full[r.start:r.end] = s.detach().float()
        torch.distributed.all_reduce(full, group=sub.data_parallel_group)
        return full.view_as(param)
    return None


def theta_stats(gpt_model, optimizer, num_layers: int) -> Dict[str, torch.Tensor]:
    """Collective. {vector type: [num_layers, 4] (mean, std, min, max)}, NaN rows for layers without CE.

    Read from the fp32 master weights (DESIGN.md §1 item 9: in bf16 the spacing at 1.0 is 2^-7 and
    small updates would not show in the model copy)."""
    masters = _master_map(optimizer)
    names = ("gate", "up", "down", "hidden")
    stats = torch.zeros(len(names), num_layers, 4, dtype=torch.float64)
    count = torch.zeros(len(names), num_layers, 1, dtype=torch.float64)
    for n, layer in sorted(moe_layers(gpt_model).items()):
        ce = getattr(layer, "ce", None)
        if ce is None:
            continue
        for j, name in enumerate(names):
            p = getattr(ce, name, None)
            if p is None:
                continue
            t = masters.get(id(p))
            if t is None and p.dtype != torch.float32:
                t = _dist_master(optimizer, p)
            t = (p if t is None else t).detach().double()
            stats[j, n - 1] = torch.stack([t.mean(), t.std(unbiased=False), t.min(), t.max()])
            count[j, n - 1] = 1
    # Pipeline stages fill their own layers; replicas of a layer hold the same values.
    flat = torch.cat([stats.flatten(), count.flatten()])
    torch.distributed.all_reduce(flat)
    stats, count = flat[: stats.numel()].view_as(stats), flat[stats.numel():].view_as(count)
    stats = torch.where(count > 0, stats / count.clamp_min(1), torch.full_like(stats, math.nan))
    return {name: stats[j] for j, name in enumerate(names) if bool((count[j] > 0).any())}


# ----------------------------------------------------------------------------------------------
# writer + log line
# ----------------------------------------------------------------------------------------------


class MetricsWriter:
    """TensorBoard scalars (rank 0 only) and the one-line log."""

    def __init__(self, log_dir: Optional[str], purge_step: Optional[int] = None):
        self.tb = None
        if log_dir and torch.distributed.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int):
        if self.tb is not None and value is not None and not math.isnan(value):
            self.tb.add_scalar(tag, value, step)

    def training(self, step: int, m: Dict[str, float], routing: Dict[str, List[float]],
                 theta: Dict[str, torch.Tensor]):
        for k, v in m.items():
            self.scalar(f"train/{k}", v, step)
        if routing.get("layer"):
            for key in ("load_min", "load_max", "load_cv", "aux_mass", "main_per_token", "lb_loss",
                        "aux_loss"):
                vals = routing[key]
                for n, v in zip(routing["layer"], vals):
                    self.scalar(f"moe/{key}/layer_{n:02d}", v, step)
                self.scalar(f"moe/{key}", sum(vals) / len(vals), step)
            if self.tb is not None:  # main experts per token: histogram per layer
                for n, counts in zip(routing["layer"], routing["main_per_token_hist"]):
                    self._histogram(f"moe/main_per_token_hist/layer_{n:02d}", counts, step)
        for name, s in theta.items():
            for n in range(s.shape[0]):
                for k, stat in enumerate(("mean", "std", "min", "max")):
                    self.scalar(f"theta/{name}_{stat}/layer_{n + 1:02d}", float(s[n, k]), step)

    def _histogram(self, tag: str, counts: List[float], step: int):
        import numpy as np

        c = np.asarray(counts, dtype=np.float64)
        if c.sum() <= 0:
            return
        values = np.arange(len(c), dtype=np.float64)
        used = np.nonzero(c)[0]
        lo, hi = int(used.min()), int(used.max())
        self.tb.add_histogram_raw(
            tag, min=float(lo), max=float(hi), num=float(c.sum()), sum=float((c * values).sum()),
            sum_squares=float((c * values**2).sum()),
            bucket_limits=[v + 0.5 for v in range(lo, hi + 1)], bucket_counts=c[lo : hi + 1].tolist(),
            global_step=step)

    def flush(self):
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def log_line(step: int, total: int, m: Dict[str, float], routing: Dict[str, List[float]],
             theta: Dict[str, torch.Tensor]) -> str:
    parts = [f"iter {step:6d}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}",
             f"grad norm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:.0f} tok/s"]
    if routing.get("layer"):
        mean = lambda k: sum(routing[k]) / len(routing[k])  # noqa: E731
        cv = routing["load_cv"]
        worst = max(range(len(cv)), key=cv.__getitem__)
        parts += [f"aux loss {mean('aux_loss'):.4f} (lb {mean('lb_loss'):.3f})",
                  f"load cv {mean('load_cv'):.2f} (max {cv[worst]:.2f} L{routing['layer'][worst]})"]
        if any(routing["aux_mass"]):
            parts.append(f"aux mass {mean('aux_mass'):.3f}")
    if theta:
        drift = max(float(torch.nan_to_num(torch.maximum((s[:, 2] - 1).abs(), (s[:, 3] - 1).abs()),
                                           nan=0.0).max()) for s in theta.values())
        parts.append(f"|theta-1| max {drift:.2e}")
    return " | ".join(parts)
