"""Scaled-down reproduction of the paper's accuracy/latency trade-off (Fig. 4) on a CPU.

For each of several PRETRAINING seeds (not only SFT seeds), each seed in a worker process of its own
(--workers, one torch thread each; a seed's numbers do not depend on the process, reproduce/workers.py):
1. Pretrain a small OLMoE-style MoE (megatron-core GPTModel via `megatron_ce.models.olmoe`; softmax
   router, no top-k renormalisation, SwiGLU experts, RMSNorm) with top-k = 4 of 16 experts and the
   load-balancing loss on a synthetic character-level mixture (addition of 1/3/4-digit numbers,
   subtraction, reversal, copy). Additions of the SFT width never occur in it. Pretraining gate
   (--gate-acc, off by default): while greedy exact match on fixed additions of a pretraining width is
   below the threshold, pretraining continues at the schedule's floor lr, up to --pretrain-max-mult x
   the steps; every seed is kept and its steps, check values and pass/fail are reported.
2. From that checkpoint, SFT every variant with the same data order (paired): 2-digit addition, answer
   least-significant digit first, loss on the answer tokens, no load-balancing loss:
     top-4, top-2, top-1                 router top-k cut (megatron-core's stock MoE layer)
     top-2+CE                            top-4 router, k_a = 2 compressed experts (ia3), theta = 1
     top-2+CE hidden                     the same with the `hidden` CE variant
     top-2+CE lr×m                       theta lr = m × lr (a param group of the `is_ce_table` tensors)
     top-2+tied θ lr×m                   control: the same, with one theta row per layer shared by all
                                         experts (the auxiliary experts' identity does not matter)
     top-2+calCE n=B                     theta calibrated on the pretrained model first
                                         (megatron_ce.calibrate, B batches of SFT-distribution text)
     top-2+calCE n=B lr×m                calibrated, then SFT with theta lr = m × lr
     top-1+CE                            top-2 router, k_a = 1: the paper's k_a = 1 case (Phi-MoE's
                                         top-2 -> top-1 + 1 CE, k_m = k/2), reference top-2, baseline top-1
     mass tau=T (--taus)                 adaptive split (docs/METHOD.md §1.12)
   The multipliers m and the calibration sizes B are selected per seed on VALIDATION problems (disjoint
   from the test problems, never drawn for SFT or calibration); rows "(val)" are the selected ones.
   The defaults (16-wide experts) were chosen by scouting runs so that top-4 beats top-2
   on every pretraining seed (docs/RESULTS.md, Run D); with 64-wide experts (Run C) both
   saturate and there is no gap to recover.
3. Metrics on the same 500 test problems for every seed and variant: greedy exact match and the
   teacher-forced answer NLL (both stored per item). The gap reference − baseline and the recovery
   (x_CE − x_low)/(x_high − x_low) of both, per seed with paired bootstrap intervals over test items, and
   of the seed means with seeds and items resampled.
4. Latency once (seed 0's models), after every worker has finished: greedy decode without KV cache,
   variants interleaved.
5. CPU sensitivity: seed 0 rerun end to end with another torch thread count, alone; the change is
   reported. Other processes on the machine are not controlled: the load average at the start and end
   is written to the results.

Writes DIR/results.md, results.json, tradeoff.png after every pretraining seed (partial runs survive).

    python examples/reproduce_tradeoff.py --out runs/reproduce_v3     # default (< 20 min, 2 idle cores)
    python examples/reproduce_tradeoff.py --quick --out /tmp/rq       # about a minute (CI); --smoke = --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(HERE), HERE):  # the repo (megatron_ce) and examples/ (reproduce)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from reproduce.aggregate import arch_key, recoveries, sensitivity, summarise  # noqa: E402
from reproduce.experiment import run_seed  # noqa: E402
from reproduce.model import build, latency, load_pretrained  # noqa: E402
from reproduce.report import write_outputs  # noqa: E402
from reproduce.tasks import make_splits  # noqa: E402
from reproduce.variants import CAL_GROUP, CAL_LR_GROUP, LR_GROUP, TIED_GROUP, recovery_rows, variants  # noqa: E402
from reproduce.workers import run_seeds  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--out", default="runs/reproduce_v3")
    add("--quick", "--smoke", dest="quick", action="store_true", help="tiny sizes, seconds (CI)")
    add("--seeds", type=int, default=3, help="pretraining seeds 0..N-1")
    add("--threads", type=int, default=1, help="torch intra-op threads of the main runs (per worker)")
    add("--workers", type=int, default=2, help="pretraining seeds run in parallel processes (1: serially)")
    add("--sensitivity-threads", type=int, default=2, help="rerun seed 0 with this many threads (0: skip)")
    add("--layers", type=int, default=2)
    add("--hidden", type=int, default=64)
    add("--heads", type=int, default=4)
    add("--ffn", type=int, default=16, help="expert intermediate size")
    add("--experts", type=int, default=16)
    add("--pretrain-steps", type=int, default=1000)
    add("--pretrain-batch", type=int, default=32)
    add("--pretrain-seq", type=int, default=64)
    add("--pretrain-lr", type=float, default=3e-3)
    add("--pretrain-max-mult", type=float, default=2.0, help="gate: pretrain at most this x --pretrain-steps")
    add("--gate-acc", type=float, default=0.0,
        help="gate: pretraining continues until this exact match on held-out pretraining-width additions")
    add("--gate-n", type=int, default=200, help="gate: check problems")
    add("--sft-steps", type=int, default=200)
    add("--sft-batch", type=int, default=64)
    add("--sft-lr", type=float, default=1e-3)
    add("--n-test", "--n-eval", dest="n_test", type=int, default=500)
    add("--n-val", type=int, default=200, help="validation problems (selection of lr-mult, calibration size)")
    add("--digits", type=int, default=2, help="operand digits of the SFT addition task")
    add("--lr-mults", type=float, nargs="+", default=[10.0, 30.0], help="theta lr multipliers (grid)")
    add("--calib-batches", type=int, nargs="+", default=[1, 8], help="calibration sizes in batches (grid)")
    add("--calib-steps", type=int, default=200)
    add("--calib-lr", type=float, default=1e-2)
    add("--no-calibration", action="store_true", help="leave out the calibrated-CE rows")
    add("--n-boot", type=int, default=2000, help="bootstrap resamples")
    add("--rewrite-report", action="store_true",
        help="only recompute DIR/results.md and tradeoff.png from DIR/results.json (a finished or partial run)")
    add("--only", nargs="+", default=None, help="run only these variant names (scouting)")
    add("--taus", type=float, nargs="*", default=[], help="adaptive-split (mass) variants")
    for name, default in (("batch", 8), ("prompt", 32), ("new", 16), ("warmup", 3), ("iters", 10)):
        add(f"--lat-{name}", type=int, default=default)
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.layers, a.hidden, a.heads, a.ffn, a.experts = 2, 1, 32, 2, 32, 8
        a.pretrain_steps, a.pretrain_batch, a.pretrain_seq = 4, 4, 32
        a.sft_steps, a.sft_batch, a.n_test, a.n_val = 3, 8, 16, 8
        a.lr_mults, a.calib_batches, a.calib_steps, a.n_boot = [10.0], [1], 2, 200
        a.lat_new, a.lat_warmup, a.lat_iters, a.gate_n = 2, 0, 1, 16
    for flag in ("seeds", "threads", "workers", "pretrain_steps", "sft_steps", "n_test", "n_val", "n_boot"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if a.pretrain_max_mult < 1:
        p.error("--pretrain-max-mult must be >= 1")
    return a


def calibration_available() -> bool:
    try:
        from megatron_ce.calibrate import calibrate_ce_model  # noqa: F401
    except ImportError:
        return False
    return True


def seed0_latency(states, seed_result, a) -> dict:
    """Latency per distinct computation (aggregate.arch_key) of seed 0's SFT'd models, measured here
    after every worker has finished (nothing else of this run competes for the cores)."""
    by_key = {}
    for name, state in states.items():
        spec = seed_result["variants"][name]["spec"]
        key = arch_key(spec)
        if key not in by_key:
            m = build(a, spec["topk"], spec["k_a"], aux=0.0, variant=spec["ce"], tau=spec["tau"])
            load_pretrained(m, state)
            by_key[key] = m.eval()
    return latency(by_key, a, seed=0)


def sensitivity_run(a, res, splits, vs, rows):
    """Seed 0 again with --sensitivity-threads: the paired core rows and seed 0's selected grid members."""
    chosen = set(res["seeds"][0]["selected"].values())
    core = [v for v in vs if v.name in ("top-4", "top-2", "top-2+CE") or v.name in chosen]
    other, _ = run_seed(a, 0, splits, core, a.sensitivity_threads)
    torch.set_num_threads(a.threads)
    return sensitivity(res["seeds"][0], other, rows)


def refresh(res, lat, rows, a, t0, final: bool = False) -> None:
    res["aggregate"] = summarise(res["seeds"], lat)
    res["recovery"] = recoveries(res["seeds"], rows, a.n_boot)
    res["wall_s"] = time.perf_counter() - t0
    write_outputs(res, a.out, plot=final or not a.quick)  # the plot costs seconds (matplotlib)


def rewrite_report(a) -> None:
    with open(os.path.join(a.out, "results.json")) as f:
        res = json.load(f)
    rows = recovery_rows(CAL_GROUP in res["seeds"][0]["variants"])
    res["aggregate"] = summarise(res["seeds"], res["latency"])
    res["recovery"] = recoveries(res["seeds"], rows, res["settings"]["n_boot"])
    write_outputs(res, a.out)


def main(argv=None):
    a = parse(argv)
    if a.rewrite_report:
        return rewrite_report(a)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    from megatron_ce.runtime import init_parallel

    init_parallel(seed=1234)
    cal = not a.no_calibration and calibration_available()
    vs = [v for v in variants(a.lr_mults, a.calib_batches, a.taus, cal) if a.only is None or v.name in a.only]
    rows = recovery_rows(cal)
    splits = make_splits(a.n_test, a.n_val, a.digits)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    res = dict(settings=settings, status="running", seeds=[], latency={}, groups=[LR_GROUP, TIED_GROUP, CAL_GROUP, CAL_LR_GROUP],
               notes=[] if cal or a.no_calibration else ["megatron_ce.calibrate unavailable: no calibrated rows"],
               machine=dict(cpus=os.cpu_count(), load_start=os.getloadavg()))
    states = {}
    for out, kept in run_seeds(a, list(range(a.seeds)), vs):
        states.update(kept)
        res["seeds"] = sorted(res["seeds"] + [out], key=lambda s: s["seed"])
        refresh(res, res["latency"], rows, a, t0)
        print(f"seed {out['seed']} done ({out['wall_s']:.0f} s); wrote {a.out}/results.*", flush=True)
    res["latency"] = seed0_latency(states, res["seeds"][0], a)
    del states
    if a.sensitivity_threads:
        res["status"] = "running (CPU sensitivity check)"
        refresh(res, res["latency"], rows, a, t0)
        res["sensitivity"] = sensitivity_run(a, res, splits, vs, rows)
    res["status"] = "complete"
    res["machine"]["load_end"] = os.getloadavg()
    refresh(res, res["latency"], rows, a, t0, final=True)
    print(open(os.path.join(a.out, "results.md")).read())


if __name__ == "__main__":
    main()
