"""Plain megatron-core (no CE) under gloo: each parallel layout computes the same loss and every
gradient as the world-1 run on the same global weights and batch (tests/dist_harness.py,
max|a-b| <= 1e-5 * max|ref| + 1e-7 per layer/expert tensor), plus the harness's own failure
modes and mcore's plain vs distributed optimizer."""

import os
import time

import pytest

from megatron_ce import compat
from tests.dist_harness import (
    DistributedTestError,
    check_layout_equivalence,
    run_distributed,
    run_optimizer_steps,
)

# The legacy GroupedMLP (grouped_gemm) went in megatron-core 0.17; its layouts run on 0.16.1 only.
LEGACY_GROUPED = dict(moe_grouped_gemm=True, moe_use_legacy_grouped_gemm=True)
legacy_only = pytest.mark.skipif(not compat.HAS_LEGACY_GROUPED_MLP,
                                 reason=f"legacy GroupedMLP: megatron-core <0.17 only, found {compat.MCORE_VERSION_STR}")

# ----------------------------------------------------------------- harness behaviour


def _return_rank_info(rank, world_size, tag):
    return {"rank": rank, "world_size": world_size, "tag": tag, "env_rank": os.environ["RANK"]}


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    time.sleep(60)  # rank 0 would wait forever on its peer; the harness must not


def _hang(rank, world_size):
    time.sleep(600)


def test_run_distributed_returns_rank0_result():
    assert run_distributed(_return_rank_info, 2, "x", timeout=60) == {
        "rank": 0, "world_size": 2, "tag": "x", "env_rank": "0",
    }


def test_run_distributed_reports_failing_rank_traceback():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1, 2, timeout=60)
    msg = str(info.value)
    assert "first failure on rank 1" in msg and "ValueError: boom from rank 1" in msg
    assert "_raise_on_rank1" in msg  # the traceback, not just the message
    assert time.monotonic() - t0 < 30


def test_run_distributed_fails_a_hang_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="timed out after 3s"):
        run_distributed(_hang, 2, timeout=3)
    assert time.monotonic() - t0 < 20


# ----------------------------------------------------------------- layout equivalence

CORE_LAYOUTS = [
    dict(ep=2, dispatcher="allgather"),
    dict(ep=2, dispatcher="alltoall"),
    dict(tp=2),  # sequence parallel on (default with TP > 1)
    dict(pp=2),
]


@pytest.mark.parametrize("layout", CORE_LAYOUTS, ids=["ep2-allgather", "ep2-alltoall", "tp2-sp", "pp2"])
def test_plain_mcore_layout_matches_world1(tmp_path, layout):
    res = check_layout_equivalence(tmp_path, layout)
    res.assert_equivalent()
    assert res.num_grads >= 4 * 8 * 2, "per-layer, per-expert gradients were compared"
    assert res.max_rel_grad_err <= 1e-5 and res.loss_rel_err <= 1e-5


def test_equivalence_check_detects_a_different_model(tmp_path):
    """The comparison has teeth: a layout run whose aux-loss coefficient differs from the
    reference's must fail on gradients (the loss reported is the LM loss, so it still agrees)."""
    res = check_layout_equivalence(tmp_path, dict(world_size=1, config={"moe_aux_loss_coeff": 0.5}))
    assert res.failures and "router" in " ".join(res.failures)
    with pytest.raises(AssertionError, match="gradients differ"):
        res.assert_equivalent()


def test_plain_and_distributed_optimizer_agree_ep2():
    """mcore's Float32 optimizer vs DistributedOptimizer (Adam, grad clipping), 3 steps, EP=2."""
    out = run_optimizer_steps(dict(ep=2, dispatcher="alltoall"))
    plain, dist = out["plain"], out["distributed"]
    assert plain["losses"][-1] < plain["losses"][0]  # it trains
    for key in ("losses", "grad_norms", "load_balancing_loss"):
        for a, b in zip(plain[key], dist[key]):
            assert abs(a - b) <= 1e-5 * abs(a) + 1e-7, (key, plain[key], dist[key])


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,config",
    [
        (dict(tp=2, pp=2, ep=2, etp=1, dispatcher="alltoall"), None),
        (dict(tp=2, ep=2, dispatcher="alltoall"), None),  # expert-TP 2: uneven gather/scatter
        (dict(tp=2, ep=2, dispatcher="allgather"), None),
        (dict(pp=2, ep=2, dispatcher="allgather"), None),  # PP with DP 2
        pytest.param(dict(ep=2, dispatcher="alltoall"), LEGACY_GROUPED, marks=legacy_only),
        pytest.param(dict(tp=2, dispatcher="alltoall"), LEGACY_GROUPED, marks=legacy_only),
    ],
    ids=["tp2-pp2-ep2-a2a", "tp2-ep2-etp2-a2a", "tp2-ep2-allgather", "pp2-ep2-dp2", "ep2-grouped", "tp2-grouped"],
)
def test_plain_mcore_more_layouts(tmp_path, layout, config):
    check_layout_equivalence(tmp_path, layout, config).assert_equivalent()


@pytest.mark.slow
def test_plain_and_distributed_optimizer_agree_tp2_pp2():
    out = run_optimizer_steps(dict(tp=2, pp=2, dispatcher="alltoall"))
    for key in ("losses", "grad_norms"):
        for a, b in zip(out["plain"][key], out["distributed"][key]):
            assert abs(a - b) <= 1e-5 * abs(a) + 1e-7, (key, out)


# ----------------------------------------------------------------- CUDA (when lent a GPU)


def _cuda_runtime_facts(rank, world_size):
    import torch

    from megatron_ce import compat as _compat
    from megatron_ce.runtime import apply_cpu_shims, destroy_parallel, init_parallel

    # the legacy GroupedMLP's CPU gmm (megatron-core <0.17); later releases have none to install
    cpu_gmm = getattr(_compat.legacy_grouped_mlp(), "cpu_gmm", object())

    init_parallel(timeout_s=120)
    try:
        from megatron.core import utils as mcore_utils

        from megatron_ce import compat

        flag = torch.ones(1)  # the trainer's CPU-tensor collectives (loss sums, stop flags) go over gloo
        torch.distributed.all_reduce(flag)
        return dict(
            backend=str(torch.distributed.get_backend()),
            cpu_all_reduce=float(flag) == world_size,
            shims_applied=apply_cpu_shims(),
            mcore_torch_untouched=mcore_utils.torch is torch,
            gmm_untouched=getattr(getattr(compat.grouped_gemm_util, "ops", None), "gmm", None) is not cpu_gmm,
        )
    finally:
        destroy_parallel()


@pytest.mark.gpu
def test_cuda_runtime_is_nccl_and_unshimmed():
    facts = run_distributed(_cuda_runtime_facts, 1, timeout=120)
    assert facts == dict(backend="cpu:gloo,cuda:nccl", cpu_all_reduce=True, shims_applied=False,
                         mcore_torch_untouched=True, gmm_untouched=True), facts


@pytest.mark.gpu
def test_cuda_world1_harness_roundtrip(tmp_path):
    """The equivalence workflow on one GPU (nccl): the world-1 reference against itself."""
    res = check_layout_equivalence(tmp_path, dict(world_size=1))
    res.assert_equivalent()
    assert res.loss == pytest.approx(res.ref_loss, rel=1e-6)
