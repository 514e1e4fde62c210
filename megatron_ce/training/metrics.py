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

from megatron_ce.training.data import model_device  # one device rule for batches, loss sums, metrics


def moe_layers(gpt_model) -> Dict[int, torch.nn.Module]:
    """{global layer number (1-based): MoELayer} of this pipeline stage."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return {m.layer_number: m for m in gpt_model.modules() if isinstance(m, MoELayer)}


class RoutingStats:
    """Router statistics from forward hooks. Training (default) counts the forwards that build the
    graph; `inference=True` counts forwards run under no_grad (measurement tools).

    The hooks never synchronise with the host: the counters are device tensors (views of one packed
    buffer) that the hooks add to asynchronously, and `reduce_and_reset` does the log interval's one
    all-reduce and one device-to-host copy (a sync per MoE layer and micro-batch would stall the GPU
    queue of every training step)."""

    _FIELDS = ("main_load", "topk_load", "score_sum", "aux_mass", "tokens", "n_main_hist")

    def __init__(self, gpt_model, num_layers: int, num_experts: int, inference: bool = False):
        self.L, self.E = num_layers, num_experts
        self.enabled = True
        # Full activation recompute runs each layer's forward twice: first under no_grad, then again
        # with grad in the backward pass. Count the first one only.
        recompute = getattr(gpt_model.config, "recompute_granularity", None) == "full"
        self.count_with_grad = not inference and not recompute
        self.layers = moe_layers(gpt_model)
        self.device = model_device(gpt_model)
        self._flat = None
        self._reset()
        self._handles = [layer.router.register_forward_hook(self._hook(n))
                         for n, layer in self.layers.items()]

    def close(self):
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _fields(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Views of a packed buffer, in _FIELDS order. n_main_hist: tokens with m main experts,
        m = 0..E (varies per token under --moe-ce-split mass)."""
        L, E = self.L, self.E
        shapes = ((L, E), (L, E), (L, E), (L,), (L,), (L, E + 1))
        parts = flat.split([math.prod(s) for s in shapes])
        return [part.view(shape) for part, shape in zip(parts, shapes)]

    def _reset(self):
        # One buffer, so the reduction is one all-reduce with no concatenation.
        if self._flat is None:
            L, E = self.L, self.E
            self._flat = torch.zeros(3 * L * E + 2 * L + L * (E + 1), dtype=torch.float64, device=self.device)
        else:
            self._flat.zero_()
        for name, view in zip(self._FIELDS, self._fields(self._flat)):
            setattr(self, name, view)

    def _hook(self, layer_number: int):
        def hook(router, inputs, output):
            if not self.enabled or torch.is_grad_enabled() != self.count_with_grad:
                return
            with torch.no_grad():
                self._accumulate(layer_number - 1, router, inputs[0], *output)
        return hook

    def _accumulate(self, i: int, router, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        """Adds one router call to layer row i. Device ops only: no .item()/.cpu()/bincount
        (CUDA bincount reads its max back to size the output)."""
        dev = self.device
        T = routing_map.shape[0]
        self.tokens[i] += T
        self.topk_load[i] += routing_map.sum(0).to(dev)
        if getattr(router, "ce_num_compressed", 0) > 0:
            _, main_map, _, _ = router.split_main_aux(probs, routing_map)
            routed = (probs * routing_map).sum(-1).double()
            aux = routed - (probs * main_map).sum(-1).double()  # the top-k mass not run
            self.aux_mass[i] += (aux / routed.clamp_min(1e-30)).sum().to(dev)
        else:
            main_map = routing_map
        self.main_load[i] += main_map.sum(0).to(dev)
        n_main = main_map.sum(-1).to(dev)
        self.n_main_hist[i].index_add_(0, n_main, torch.ones(T, dtype=torch.float64, device=dev))
        # Full softmax scores for the load-balancing statistic (the router's probs are only defined
        # on the selected experts).
        x = x.reshape(-1, x.shape[-1])
        scores = torch.softmax(F.linear(x.float(), router.weight.float()), dim=-1)
        self.score_sum[i] += scores.sum(0).to(dev)

    def reduce_and_reset(self, topk: int, aux_coeff: float) -> Dict[str, List[float]]:
        """Collective (all ranks). Per-layer lists (MoE layers only), then resets the counters."""
        torch.distributed.all_reduce(self._flat)
        flat = self._flat.to("cpu", copy=True)  # the interval's one device-to-host copy
        self._reset()  # zeroes the device buffer in place (copy=True: on CPU, .cpu() would alias it)
        L, E = self.L, self.E
        main, topk_load, scores, aux_mass, tokens, hist = self._fields(flat)
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

    Read from the fp32 master weights (docs/METHOD.md §1.9: in bf16 the spacing at 1.0 is 2^-7 and
    small updates would not show in the model copy)."""
    masters = _master_map(optimizer)
    names = ("gate", "up", "down", "hidden")
    # Built on the device and copied to the host once (a CPU table would sync per layer and vector).
    dev = model_device(gpt_model)
    stats = torch.zeros(len(names), num_layers, 4, dtype=torch.float64, device=dev)
    count = torch.zeros(len(names), num_layers, 1, dtype=torch.float64, device=dev)
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
            stats[j, n - 1] = torch.stack([t.mean(), t.std(unbiased=False), t.min(), t.max()]).to(dev)
            count[j, n - 1] = 1
    # Pipeline stages fill their own layers; replicas of a layer hold the same values.
    flat = torch.cat([stats.flatten(), count.flatten()])
    torch.distributed.all_reduce(flat)
    flat = flat.cpu()
    stats, count = flat[: stats.numel()].view(stats.shape), flat[stats.numel():].view(count.shape)
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


def print0(*a) -> None:
    """Print on global rank 0 only (the trainer's progress lines); without a process group, print."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*a, flush=True)


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
