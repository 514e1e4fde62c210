"""megatron_ce.runtime.cpu_shims: patched names exist in the pinned mcore, idempotence, the
grouped_gemm fallback, and the narrow replacements (in this process, no torch.distributed
except where a test sets up and tears down its own one-rank world)."""

import copy
import importlib
import logging
import sys
import types

import pytest
import torch

from megatron_ce import compat
from megatron_ce.runtime import cpu_shims
from megatron_ce.runtime.cpu_shims import ADDED_NAMES, PATCHED_NAMES, apply_cpu_shims
from tests.dist_harness import run_distributed

# The grouped_gemm stand-in exists only with the legacy GroupedMLP (megatron-core <0.17).
cpu_gmm = getattr(compat.legacy_grouped_mlp(), "cpu_gmm", None)
legacy_only = pytest.mark.skipif(cpu_gmm is None, reason=f"legacy GroupedMLP: megatron-core <0.17 only, found "
                                 f"{compat.MCORE_VERSION_STR}")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inert with CUDA")


def _resolve(module, attr):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_mcore_is_a_supported_version():
    import megatron.core

    from megatron_ce import compat

    v = tuple(int(x) for x in megatron.core.__version__.split(".")[:3] if x.isdigit())
    assert v == (0, 16, 1) or (0, 19, 2) <= v < (0, 20), "shims were written against 0.16.1 and 0.19.x"
    assert compat.MCORE_VERSION == v


def test_legacy_grouped_mlp_patches_listed_exactly_where_it_exists():
    from megatron_ce import compat

    gg, experts = "megatron.core.transformer.moe.grouped_gemm_util", "megatron.core.transformer.moe.experts"
    legacy = {(gg, "grouped_gemm"), (gg, "ops"), (experts, "GroupedMLP.forward")}
    assert legacy <= set(PATCHED_NAMES) if compat.HAS_LEGACY_GROUPED_MLP else not legacy & set(PATCHED_NAMES)


@pytest.mark.parametrize("module,attr", PATCHED_NAMES, ids=[f"{m}:{a}" for m, a in PATCHED_NAMES])
def test_patched_name_exists_in_pinned_mcore(module, attr):
    _resolve(module, attr)  # AttributeError / ImportError if mcore renamed or moved it


def test_patched_names_are_unique_and_cover_every_cuda_module():
    assert len(set(PATCHED_NAMES)) == len(PATCHED_NAMES)
    for module, _why in cpu_shims._CUDA_TORCH_MODULES:
        assert (module, "torch") in PATCHED_NAMES


def test_apply_is_idempotent():
    assert apply_cpu_shims() is True
    snapshot = {(m, a): _resolve(m, a) for m, a in PATCHED_NAMES}
    assert apply_cpu_shims() is True
    for key, value in snapshot.items():
        assert _resolve(*key) == value, f"{key} was patched again"  # == : bound classmethods
    # wrappers wrap the original exactly once
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    assert not hasattr(mappings._gather_along_first_dim.__wrapped__, "__wrapped__")
    assert not hasattr(WrappedTorchNorm.__new__.__wrapped__, "__wrapped__")


def test_added_te_names_exist_after_apply():
    apply_cpu_shims()
    for module, attr in ADDED_NAMES:
        assert hasattr(importlib.import_module(module), attr)


def test_apply_is_a_noop_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_shims() is False


def test_no_torch_compile_wrappers_left_in_mcore():
    apply_cpu_shims()
    left = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron.core"):
            continue
        for attr, value in vars(module).items():
            if cpu_shims.compiled_original(value) is not None:
                left.append(f"{name}.{attr}")
            elif isinstance(value, type) and value.__module__ == name:
                left += [
                    f"{name}.{attr}.{c}" for c, v in vars(value).items() if cpu_shims.compiled_original(v) is not None
                ]
    assert not left, f"torch.compile wrappers still in mcore: {left}"
    from megatron.core import jit

    # every module that binds jit_fuser by name gets the no-op (experts only while it has GroupedMLP)
    assert cpu_shims._JIT_FUSER_MODULES and all(
        importlib.import_module(m).jit_fuser is jit.noop_decorator for m in cpu_shims._JIT_FUSER_MODULES
    )


def test_cuda_literals_become_cpu_in_shimmed_modules_only():
    apply_cpu_shims()
    from megatron.core.transformer import utils as tutils
    from megatron.core.fusions import fused_softmax

    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())
    # imported by name into fused_softmax: same function, same CPU view
    assert fused_softmax.get_default_causal_mask(3).device.type == "cpu"
    assert tutils.get_sliding_window_causal_mask(4, 4, (1, 0)).device.type == "cpu"
    # the real torch is untouched
    assert torch.cuda.current_device is not tutils.torch.cuda.current_device
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_wrapped_torch_norm_with_sequence_parallel_tags_weights():
    apply_cpu_shims()
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = types.SimpleNamespace(
        layernorm_zero_centered_gamma=False, persist_layer_norm=False, sequence_parallel=True,
        memory_efficient_layer_norm=False, normalization="RMSNorm",
    )
    before = copy.copy(vars(cfg))
    norm = WrappedTorchNorm(cfg, 16, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert vars(cfg) == before  # caller's config untouched
    cfg.sequence_parallel = False
    assert not any(hasattr(p, "sequence_parallel") for p in WrappedTorchNorm(cfg, 16).parameters())


def test_clip_grads_replacement_scales_fp32_grads():
    apply_cpu_shims()
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0 / (4.0 + 1e-6)))
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)  # no clipping
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0 / (4.0 + 1e-6)))


# ----------------------------------------------------------------- grouped_gemm fallback


def _reference_gmm(a, b, sizes, trans_b):
    out, start = [], 0
    for i, n in enumerate(sizes):
        w = b[i].t() if trans_b else b[i]
        out.append(a[start : start + n] @ w)
        start += n
    return torch.cat(out) if out else a.new_zeros(0, b.shape[1] if trans_b else b.shape[2])


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize(
    "sizes",
    [[3, 1, 4, 2], [0, 5, 0, 3], [4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]],
    ids=["all-nonzero", "zeros-between", "zeros-trailing", "all-zero", "one-group"],
)
@legacy_only
def test_cpu_gmm_matches_per_chunk_matmul(sizes, trans_b):
    g = torch.Generator().manual_seed(0)
    k, n = 6, 5
    a = torch.randn(sum(sizes), k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(len(sizes), *((n, k) if trans_b else (k, n)), generator=g, dtype=torch.float64, requires_grad=True)
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()

    out = cpu_gmm(a, b, torch.tensor(sizes), trans_b=trans_b)
    ref = _reference_gmm(a_ref, b_ref, sizes, trans_b)
    assert out.shape == (sum(sizes), n)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, a_ref.grad if a_ref.grad is not None else torch.zeros_like(a))
    torch.testing.assert_close(b.grad, b_ref.grad if b_ref.grad is not None else torch.zeros_like(b))
    for i, s in enumerate(sizes):  # groups with no rows get exactly zero gradient
        if s == 0:
            assert torch.count_nonzero(b.grad[i]) == 0


@legacy_only
def test_cpu_gmm_rejects_inconsistent_sizes():
    with pytest.raises(ValueError):
        cpu_gmm(torch.zeros(3, 2), torch.zeros(2, 2, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError):
        cpu_gmm(torch.zeros(2, 2), torch.zeros(3, 2, 2), torch.tensor([1, 1]))


def test_grouped_gemm_fallback_installed():
    from megatron_ce import compat

    if not compat.HAS_LEGACY_GROUPED_MLP:
        pytest.skip(f"legacy GroupedMLP / grouped_gemm_util: megatron-core <0.17 only, found {compat.MCORE_VERSION_STR}")
    apply_cpu_shims()
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    try:
        import grouped_gemm  # noqa: F401

        pytest.skip("the real grouped_gemm package is installed")
    except ImportError:
        pass
    assert gg.grouped_gemm_is_available()
    gg.assert_grouped_gemm_is_available()
    assert gg.ops.gmm is cpu_gmm
    a, b = torch.randn(5, 4), torch.randn(2, 4, 3)
    torch.testing.assert_close(gg.ops.gmm(a, b, torch.tensor([2, 3]), trans_b=False), torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))


# ----------------------------------------------------------------- init_parallel


def test_init_parallel_rejects_indivisible_world():
    from megatron_ce.runtime import destroy_parallel, init_parallel

    was_initialized = torch.distributed.is_initialized()
    try:
        with pytest.raises(ValueError, match=r"--tensor-model-parallel-size \(2\).*--pipeline-model-parallel-size \(1\)"):
            init_parallel(tp=2)  # a one-rank world cannot hold TP=2
    finally:
        if not was_initialized:
            destroy_parallel()


# ----------------------------------------------------------------- multi-process pieces


def _collectives_rank(rank, world_size):
    """Uneven gather / reduce-scatter fallbacks and the CPU RNG tracker, on 2 gloo ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import mappings

    from megatron_ce.runtime import destroy_parallel, init_parallel

    init_parallel(tp=2, seed=7, timeout_s=60)
    try:
        group = ps.get_tensor_model_parallel_group()
        sizes = [3, 1]
        mine = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 10 * rank
        gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
        full = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(2.0).reshape(1, 2) + 10])
        ok_gather = torch.equal(gathered, full)
        rs = mappings._reduce_scatter_along_first_dim(full * (rank + 1), group, input_split_sizes=sizes)
        ok_rs = torch.equal(rs, (full * 3)[sum(sizes[:rank]) : sum(sizes[: rank + 1])])

        tracker = tensor_parallel.get_cuda_rng_tracker()
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
        before = torch.get_rng_state()
        with tracker.fork():  # model-parallel stream: differs across TP ranks
            a = torch.rand(4)
        ok_restored = torch.equal(before, torch.get_rng_state())
        no_spurious_warning = not [r for r in records if "RNG state changed" in r.getMessage()]
        with tracker.fork():  # the stream advanced
            b = torch.rand(4)
        both = [torch.empty(4) for _ in range(2)]
        torch.distributed.all_gather(both, a, group=group)
        return dict(
            gather=ok_gather, reduce_scatter=ok_rs, rng_restored=ok_restored,
            rng_advances=not torch.equal(a, b), rng_differs_across_tp=not torch.equal(both[0], both[1]),
            no_spurious_rng_warning=no_spurious_warning,
        )
    finally:
        destroy_parallel()


def test_uneven_collectives_and_rng_tracker_two_ranks():
    res = run_distributed(_collectives_rank, 2, timeout=120)
    assert all(res.values()), res
