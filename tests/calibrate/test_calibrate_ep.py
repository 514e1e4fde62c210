"""Calibration under expert (and tensor) parallelism, 2 gloo ranks, equals the one-rank calibration.

Reference: one rank, each step on the whole global batch. EP=2: the same weights (a dist checkpoint),
each rank holding half of the experts and half of every global batch (EP ranks are data-parallel for
the dense weights and theta). TP=2 with sequence parallelism (slow): both ranks get the whole batch,
each MoE layer sees half of the sequence. theta is replicated; its gradient is summed over the ranks
as training does, so both ranks must end with the reference theta."""

import pytest
import torch

from megatron_ce.calibrate import calibrate_ce_model
from tests.calibrate.utils import batches, build, make_experts_identical, theta_tensors, tiny_hf_config
from tests.dist_harness import run_distributed

STEPS, LR = 8, 5e-2
OVERRIDES = dict(moe_token_dispatcher_type="alltoall")


def _halves(data, rank):
    return [{k: v.chunk(2)[rank] for k, v in b.items()} for b in data]


def _rank_fn(rank, world_size, ckpt, cfg, variant, layout):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_ce.runtime import destroy_parallel, init_parallel

    init_parallel(tp=layout.get("tp", 1), ep=layout.get("ep", 1), timeout_s=120)
    split = _halves if layout.get("tp", 1) == 1 else (lambda data, rank: data)  # DP=2 ranks or TP=2 ranks
    try:
        model = build(cfg, 2, variant, **OVERRIDES, sequence_parallel=layout.get("tp", 1) > 1)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        result = calibrate_ce_model(model, split(batches(0, n=2, b=4), rank), steps=STEPS, lr=LR,
                                    holdout_batches=split(batches(1, n=1, b=4), rank), keep_if_worse=True)
        theta = theta_tensors(model)
        others = [torch.empty_like(v) for v in theta.values()]
        for mine, other in zip(theta.values(), others):  # rank 1's replica, to compare on rank 0
            dist.broadcast(other.copy_(mine), src=1)
        return theta, dict(zip(theta, others)), result.to_dict()
    finally:
        destroy_parallel()


@pytest.mark.parametrize("variant,layout", [
    ("ia3", {"ep": 2}),
    pytest.param("hidden", {"ep": 2}, marks=pytest.mark.slow),
    pytest.param("ia3", {"tp": 2}, marks=pytest.mark.slow),
])
def test_parallel_equals_one_rank(world1, tmp_path, variant, layout):
    from megatron.core import dist_checkpointing

    cfg = tiny_hf_config(layers=2)
    model = build(cfg, 2, variant, **OVERRIDES)
    make_experts_identical(model, router_scale=0.5)
    with torch.no_grad():  # distinct experts too: perturb each one
        for layer in model.decoder.layers:
            for i, expert in enumerate(layer.mlp.experts.local_experts):
                for p in expert.parameters():
                    p.add_(0.05 * (i + 1) * torch.randn_like(p))
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    ref = calibrate_ce_model(model, batches(0, n=2, b=4), steps=STEPS, lr=LR, holdout_batches=batches(1, n=1, b=4),
                             keep_if_worse=True)
    theta_ref = theta_tensors(model)
    theta0, theta1, got = run_distributed(_rank_fn, 2, str(tmp_path), cfg, variant, layout, timeout=240)
    for name, t in theta_ref.items():
        assert not torch.equal(t, torch.ones_like(t)), name  # the fit moved theta
        torch.testing.assert_close(theta0[name], t, rtol=1e-4, atol=1e-5)
        assert torch.equal(theta0[name], theta1[name]), name  # replicas stay identical
    for mine, theirs in zip(ref.to_dict()["layers"], got["layers"]):
        for key in ("rel_err_topk_m", "rel_err_calibrated", "expert_cosine"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-6), key
    for key, value in ref.losses.items():
        assert got["heldout_loss"][key] == pytest.approx(value, rel=1e-5), key
