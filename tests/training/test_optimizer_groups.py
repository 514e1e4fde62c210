"""Weight decay leaves the CE theta tables alone; --moe-ce-lr-mult scales their learning rate
(issue 12 item 4), with megatron-core's plain and distributed optimizer.

One optimizer step with all gradients zero isolates weight decay: Adam's update is 0, so AdamW's
decoupled decay is the only change, p <- p * (1 - lr * wd). A 2-D weight must shrink by exactly that
factor; the theta tables (2-D too, neutral value 1) must stay at 1.
"""

import math

import pytest

from tests.dist_harness import run_distributed
from tests.training.conftest import TINY

WD, LR, INIT_LR, WARMUP, MULT = 0.1, 1e-3, 1e-4, 2, 10.0


def _args(extra):
    base = list(TINY)
    i = base.index("--lr-warmup-iters")
    del base[i:i + 2]
    return base + ["--train-iters", "6", "--lr", str(LR), "--min-lr", "1e-4", "--lr-warmup-iters", str(WARMUP),
                   "--lr-warmup-init", str(INIT_LR), "--weight-decay", str(WD), *extra]


def _rank_fn(rank, world_size, extra):

    from megatron_ce.runtime import destroy_parallel, init_parallel
    from megatron_ce.training.args import parse_args
    from megatron_ce.training.loop import wrap_model
    from megatron_ce.training.model import model_provider
    from megatron_ce.training import optimizer as opt_mod

    init_parallel(timeout_s=120)
    out = {}
    try:
        for dist in (False, True):
            args = parse_args(_args(extra + (["--use-distributed-optimizer"] if dist else [])), world_size=1)
            gpt, _ = model_provider(args, 100)
            model = wrap_model(gpt, args)
            optimizer, scheduler = opt_mod.build_optimizer(model, args, 6)
            named = dict(gpt.named_parameters())
            thetas = {n: p for n, p in named.items() if ".ce." in n}
            weight = named["decoder.layers.0.self_attention.linear_qkv.weight"]
            expert = next(p for n, p in named.items() if "experts" in n and p.dim() >= 2)
            before_w, before_e = weight.detach().clone(), expert.detach().clone()
            base_lr0 = opt_mod.logged_lr(optimizer)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            ok, _, _ = optimizer.step()
            theta_dev = max((p.detach() - 1).abs().max().item() for p in thetas.values())
            w_ratio = (weight.detach() / before_w).mean().item()
            e_ratio = (expert.detach() / before_e).mean().item()
            lrs = []
            for _ in range(5):
                scheduler.step(increment=1)
                ce = [g for g in optimizer.param_groups if g.get("lr_mult", 1.0) != 1.0]
                lrs.append(dict(base=opt_mod.logged_lr(optimizer), ce=[g["lr"] for g in ce],
                                ce_numel=sum(p.numel() for g in ce for p in g["params"])))
            out["distributed" if dist else "plain"] = dict(
                ok=ok, n_theta=len(thetas), theta_numel=sum(p.numel() for p in thetas.values()),
                theta_dev=theta_dev, w_ratio=w_ratio, e_ratio=e_ratio, lr0=base_lr0, lrs=lrs)
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_rank_fn, 1, ["--moe-ce-lr-mult", str(MULT)], timeout=180, cuda=False)


def _base_lr(step):
    """The schedule written from its definition: linear warmup from INIT_LR, then cosine to min-lr
    over --train-iters (6)."""
    if step <= WARMUP:
        return INIT_LR + (LR - INIT_LR) * step / WARMUP
    return 1e-4 + 0.5 * (math.cos(math.pi * (step - WARMUP) / (6 - WARMUP)) + 1) * (LR - 1e-4)


@pytest.mark.parametrize("kind", ["plain", "distributed"])
def test_weight_decay_spares_theta(results, kind):
    r = results[kind]
    assert r["ok"] and r["n_theta"] == 2 * 3  # 2 layers x (gate, up, down)
    assert r["lr0"] == pytest.approx(INIT_LR, rel=1e-12)
    shrink = 1 - INIT_LR * WD  # 1 - 1e-5; fp32 rounding of p * shrink is ~1e-7 relative
    assert r["w_ratio"] == pytest.approx(shrink, abs=1e-6)  # an ordinary 2-D weight is decayed ...
    assert r["e_ratio"] == pytest.approx(shrink, abs=1e-6)  # ... expert weights too
    assert r["theta_dev"] == 0.0  # ... theta stays exactly at its neutral value 1


@pytest.mark.parametrize("kind", ["plain", "distributed"])
def test_ce_lr_mult_over_the_schedule(results, kind):
    r = results[kind]
    for step, lr in enumerate(r["lrs"], start=1):
        assert lr["base"] == pytest.approx(_base_lr(step), rel=1e-9), step
        assert lr["ce"] and all(x == pytest.approx(MULT * lr["base"], rel=1e-12) for x in lr["ce"]), (step, lr)
        assert lr["ce_numel"] == r["theta_numel"]  # that group holds exactly the theta tables
