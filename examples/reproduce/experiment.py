"""One pretraining seed of the reproduction: pretrain, then every variant from that same checkpoint with
the same SFT data order (paired), scored on the shared test and validation problems."""

from __future__ import annotations

import random
import statistics
import time
from typing import Dict, List, Tuple

import torch

from . import model as M
from .tasks import add_example, pretrain_batch, sft_batch
from .variants import Variant, select


def gate_problems(a) -> List:
    """The pretraining gate's check: fixed additions of a width the pretraining mixture does contain
    (never the SFT width), drawn from their own generator."""
    rng = random.Random(20_000)
    return [add_example(rng, gate_width(a.digits)) for _ in range(a.gate_n)]


def gate_width(sft_digits: int) -> int:
    return max(w for w in (1, 2, 3) if w != sft_digits)


def pretrain(a, seed: int) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Top-4 with the load-balancing loss for a.pretrain_steps; then, while the gate's check (greedy exact
    match on gate_problems) is below a.gate_acc, more steps at the schedule's floor lr, in quarters of
    a.pretrain_steps, up to a.pretrain_max_mult x a.pretrain_steps. A seed that never passes is kept and
    reported (`passed`: False), never dropped. Returns (state dict, record)."""
    torch.manual_seed(seed)
    base = M.build(a, 4, 0, aux=0.01)
    rng = random.Random(seed)
    losses: List[float] = []
    opt = M.make_optimizer(base, a.pretrain_lr, 1.0)
    check, limit, step, history = gate_problems(a), int(a.pretrain_max_mult * a.pretrain_steps), 0, []

    def batch(_step):
        return (pretrain_batch(rng, a.pretrain_batch, a.pretrain_seq, a.digits),)

    while True:
        n = a.pretrain_steps if step == 0 else min(max(1, a.pretrain_steps // 4), limit - step)
        M.run_steps(base, opt, range(step, step + n), a.pretrain_steps, a.pretrain_lr, batch,
                    f"pretrain seed {seed}", max(1, a.pretrain_steps // 5), losses=losses)
        step += n
        ev = M.evaluate(base, check)
        history.append([step, statistics.mean(ev["correct"]), statistics.mean(ev["nll"])])
        print(f"  [pretrain seed {seed}] gate check after {step} steps: {100 * history[-1][1]:.1f}% "
              f"exact match, answer NLL {history[-1][2]:.3f} on {gate_width(a.digits)}-digit additions "
              f"(pass: {100 * a.gate_acc:.0f}%)", flush=True)
        if history[-1][1] >= a.gate_acc or step >= limit:
            break
    state = {k: v.detach().clone() for k, v in base.state_dict().items() if not k.endswith("_extra_state")}
    tail = losses[-max(1, a.pretrain_steps // 10):]
    return state, dict(loss=statistics.mean(tail), steps=step, passed=history[-1][1] >= a.gate_acc,
                       gate_history=history)


def calibrate(m, a, v: Variant, seed: int, sample) -> Dict:
    """Fit theta on the pretrained model (top-k_m + CE towards the full top-k, per layer) on v.calib
    batches of SFT-distribution problems (prompt + answer; never a test or validation pair)."""
    from megatron_ce.calibrate import calibrate_ce_model

    rng = random.Random(70_000 + seed)

    def batches(n):
        out = []
        for _ in range(n):
            toks = sft_batch([sample(rng) for _ in range(a.sft_batch)])[0]
            out.append(dict(tokens=toks, position_ids=torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)))
        return out

    train_b, hold_b = batches(v.calib), batches(1)
    t = time.perf_counter()
    res = calibrate_ce_model(m, train_b, steps=a.calib_steps, lr=a.calib_lr, holdout_batches=hold_b)
    return dict(seconds=time.perf_counter() - t, summary=_calib_summary(res))


def _calib_summary(res) -> Dict:
    """The calibration's per-layer errors and held-out losses, as plain data for the JSON."""
    if hasattr(res, "to_dict"):
        return res.to_dict()
    return dict(repr=repr(res))


def active_params(m, v: Variant, main_per_layer) -> float:
    """Parameters used per token: exact for a fixed split, the expectation over the measured main
    experts per token for the mass split (tools/count_params.py's formula)."""
    from megatron_ce.paper.params import expected_active_params, model_counts

    counts = model_counts(m)
    run = main_per_layer or [v.experts_run] * counts["moe_layers"]
    return expected_active_params(counts, run, v.topk)


def run_variant(a, v: Variant, state, seed: int, splits) -> Tuple[Dict, torch.nn.Module]:
    test, val, sample = splits
    torch.manual_seed(seed)
    m = M.build(a, v.topk, v.k_a, aux=0.0, variant=v.ce, tau=v.tau)
    M.load_pretrained(m, state)
    if v.tied:
        M.tie_theta_rows(m)
    r: Dict = dict(spec=v.as_dict())
    if v.calib:
        r["calibration"] = calibrate(m, a, v, seed, sample)
        r["theta_drift_calibration"] = M.theta_drift(m)
    before = M.evaluate(m, test)
    r.update(acc0=statistics.mean(before["correct"]), nll0=statistics.mean(before["nll"]))
    drng = random.Random(seed)  # the same SFT data order for every variant of this seed
    M.train(m, a.sft_steps, a.sft_lr, lambda s: sft_batch([sample(drng) for _ in range(a.sft_batch)]),
            f"seed {seed} {v.name}", max(1, a.sft_steps // 2), ce_lr_mult=v.lr_mult)
    after, on_val = M.evaluate(m, test), M.evaluate(m, val)
    r.update(correct=after["correct"], nll_items=after["nll"], acc=statistics.mean(after["correct"]), nll=statistics.mean(after["nll"]),
             val_acc=statistics.mean(on_val["correct"]), val_nll=statistics.mean(on_val["nll"]),
             theta_drift=M.theta_drift(m))
    if v.tau is not None:
        r["main_per_layer"] = M.main_experts_per_token(m, test)
    r["active_params"] = active_params(m, v, r.get("main_per_layer"))
    print(f"seed {seed} {v.name}: test exact match {r['acc']:.3f} (before SFT {r['acc0']:.3f}), "
          f"nll {r['nll']:.4f}, val {r['val_acc']:.3f}, max|theta-1| {r['theta_drift']}", flush=True)
    return r, m


def reset_rng(seed: int = 1234) -> None:
    """The generators init_parallel seeds, reset, so that a seed's numbers do not depend on what ran
    before it in the same process (workers.py)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def run_seed(a, seed: int, splits, variants: List[Variant], threads: int, keep_models: bool = False):
    """Results of one pretraining seed: {'variants': {name: result}, 'selected': {group: member}}."""
    torch.set_num_threads(threads)
    reset_rng()
    t0 = time.perf_counter()
    state, pre = pretrain(a, seed)
    out: Dict = dict(seed=seed, threads=threads, pretrain_loss=pre["loss"], pretrain=pre, variants={},
                     selected={})
    models = {}
    for v in variants:
        out["variants"][v.name], m = run_variant(a, v, state, seed, splits)
        if keep_models:
            models[v.name] = m
    for group in sorted({v.group for v in variants if v.group}):
        members = [v.name for v in variants if v.group == group]
        chosen = select(out["variants"], members)
        out["selected"][group] = chosen
        out["variants"][group] = dict(out["variants"][chosen], selected=chosen)
    out["wall_s"] = time.perf_counter() - t0
    return out, models
