"""CE fc1 of the Transformer-Engine experts (CETEGroupedMLP) reads each expert's [2F, d] weight in place:
no per-step stack / cat / copy of the weights, forward or backward, and the gate / up results and the
weight gradients equal plain per-expert matmuls. TE is not needed: without it (or on CPU) the same
autograd function runs one torch.mm per expert; the TE grouped-GEMM branch is checked on GPU in
tests/ce/test_ce_gpu.py."""

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ce.ce.experts import CETEGroupedMLP

E, D, F, TPE = 4, 12, 10, [3, 0, 5, 2]
COPYING = {"stack", "cat", "clone", "_to_copy", "copy_", "contiguous", "index_select", "index"}


class _Recorder(TorchDispatchMode):
    """Names of the ops that read a weight's storage."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr() for w in weights}
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() in self.ptrs for t in flat):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _te_experts():
    """A CETEGroupedMLP shell holding what _ce_fc1 reads (TE itself cannot be built without CUDA)."""
    m = CETEGroupedMLP.__new__(CETEGroupedMLP)
    torch.nn.Module.__init__(m)
    m.linear_fc1 = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    for i in range(E):
        m.linear_fc1.register_parameter(f"weight{i}", torch.nn.Parameter(torch.randn(2 * F, D, generator=g)))
    m.num_local_experts = E
    m.config = SimpleNamespace(add_bias_linear=False)
    return m


def test_te_experts_fc1_reads_weights_in_place():
    m = _te_experts()
    weights = [getattr(m.linear_fc1, f"weight{i}") for i in range(E)]
    x_gate = torch.randn(sum(TPE), D, requires_grad=True)
    x_up = torch.randn(sum(TPE), D, requires_grad=True)
    d_gate, d_up = torch.randn(sum(TPE), F), torch.randn(sum(TPE), F)

    rec = _Recorder(weights)
    with rec:
        gate, up = m._ce_fc1(x_gate, x_up, TPE)
        torch.autograd.backward([gate, up], [d_gate, d_up])
    assert rec.ops, "the recorder saw no op on the weights"
    assert not COPYING & set(rec.ops), sorted(set(rec.ops))

    # plain per-expert reference in fp64
    ws = [w.detach().double().requires_grad_(True) for w in weights]
    xg, xu = (t.detach().double().requires_grad_(True) for t in (x_gate, x_up))
    g_ref = torch.cat([a @ w[:F].t() for a, w in zip(xg.split(TPE), ws)])
    u_ref = torch.cat([a @ w[F:].t() for a, w in zip(xu.split(TPE), ws)])
    torch.autograd.backward([g_ref, u_ref], [d_gate.double(), d_up.double()])
    tol = 1e-5
    assert (gate.double() - g_ref).abs().max() < tol and (up.double() - u_ref).abs().max() < tol
    assert (x_gate.grad.double() - xg.grad).abs().max() < tol
    assert (x_up.grad.double() - xu.grad).abs().max() < tol
    for w, r in zip(weights, ws):
        assert w.grad.shape == w.shape and (w.grad.double() - r.grad).abs().max() < tol
    assert weights[1].grad.abs().max() == 0  # expert without rows: zero gradient, not garbage


# ----------------------------------------------------------------------------------------------
# The TE branch's plumbing on CPU, against a stand-in for TE's general_grouped_gemm written from its
# documented semantics (layout TN: out = B A^T, NN: out = B A, NT: out = B^T A; single_output: one
# output split by m_splits). Both argument conventions TE has used are covered.
# ----------------------------------------------------------------------------------------------

import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

from megatron_ce.ce import experts  # noqa: E402


def _fake_gemm_body(A, B, out, layout, m_splits, accumulate, single_output):
    outs = list(out[0].split(m_splits)) if single_output else out
    assert len(A) == len(B) == len(outs)
    for a, b, o in zip(A, B, outs):
        assert a.is_contiguous() and b.is_contiguous() and o.is_contiguous()  # TE reads dense row-major
        if a.numel() == 0 or b.numel() == 0:
            continue  # TE skips empty GEMMs; whatever `o` held stays
        r = {"TN": lambda: b @ a.t(), "NN": lambda: b @ a, "NT": lambda: b.t() @ a}[layout]()
        o.add_(r) if accumulate else o.copy_(r)


def _fake_new(A, B, out, quantization_params, out_dtype, layout="TN", m_splits=None, gelu=False, grad=False,
              accumulate=False, bias=None, use_bias=False, use_split_accumulator=False, D_dtype=None,
              single_output=False):
    assert list(quantization_params) == [None] * len(A) and out_dtype == out[0].dtype
    _fake_gemm_body(A, B, out, layout, m_splits, accumulate, single_output)


def _fake_old(A, B, out, out_dtype, workspaces, layout="TN", m_splits=None, gelu=False, grad=False,
              accumulate=False, bias=None, use_bias=False, use_split_accumulator=False, D_dtype=None,
              single_output=False):
    assert workspaces == "ws" and out_dtype == out[0].dtype
    _fake_gemm_body(A, B, out, layout, m_splits, accumulate, single_output)


@pytest.mark.parametrize("fake", [_fake_new, _fake_old], ids=["te>=2.3", "te<=2.2"])
def test_te_branch_plumbing(monkeypatch, fake):
    ext = types.ModuleType("transformer_engine.pytorch.cpp_extensions")
    ext.general_grouped_gemm = fake
    base = types.ModuleType("transformer_engine.pytorch.module.base")
    base.get_multi_stream_cublas_workspace = lambda: "ws"
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.module"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, ext.__name__, ext)
    monkeypatch.setitem(sys.modules, base.__name__, base)
    experts._te_grouped_gemm.cache_clear()
    monkeypatch.setattr(experts._TEGEMM, "usable", staticmethod(lambda x, ws, out_dim_first: out_dim_first))
    try:
        assert experts._te_grouped_gemm() is not None
        # garbage in fresh buffers shows up if the branch relies on TE zeroing anything
        nan = float("nan")
        monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *s, **k: torch.full(s, nan, dtype=t.dtype))
        empty_like = torch.empty_like
        monkeypatch.setattr(torch, "empty_like", lambda t, **k: empty_like(t, **k).fill_(nan))
        test_te_experts_fc1_reads_weights_in_place()
    finally:
        experts._te_grouped_gemm.cache_clear()
