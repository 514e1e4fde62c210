"""megatron-core expert modules that accept per-token CE scales (the "ia3" variant).

For one dispatched token row x with scales (c_g, c_u, c_d) and router weight p, a main expert computes
    p * W_d( (silu(W_g (x*c_g)) * W_u (x*c_u)) * c_d )
megatron-core fuses W_g and W_u into one fc1 GEMM; since the two halves now see different inputs, fc1
runs as two GEMMs over its gate and up halves (same FLOPs). The weights stay the parent's parameters,
so state dicts and dist checkpoints are unchanged. Without scales the parent's forward runs untouched.

The two fc1 GEMMs read each expert's gate and up halves in place (row views of its [2F, d] weight):
no weight is copied or stacked per step. On CUDA with Transformer Engine they run as TE grouped GEMMs
(SequentialMLP and TEGroupedMLP experts alike); otherwise as one torch.mm per expert. The legacy grouped
experts of megatron-core <0.17 have their CE class in megatron_ce/legacy_grouped_mlp.py, which adds
itself to CE_EXPERTS.

With the bias-SwiGLU fusion on (config.bias_activation_fusion; off with --no-bias-swiglu-fusion) the
activation silu(gate) * up * scale runs as one fused autograd function that keeps only its inputs for
the backward pass.

Weight gradients go back through autograd (param.grad), also under --gradient-accumulation-fusion:
megatron-core's DDP backward hook adds param.grad into param.main_grad unless the layer that owns the
weight set `grad_added_to_main_grad` in its own backward, which only happens when that layer's
forward ran -- fc1's never does in the CE path (fc2's does, and writes main_grad itself). The TE fc1
GEMMs could accumulate straight into main_grad in fp32 as TE's own GroupedLinear does; they do not
(one bf16 weight-gradient buffer per backward, the same as without the fusion).
"""

import functools
import inspect
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.jit import jit_fuser
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

from megatron_ce import compat
from megatron_ce.ce.config import ConfigError

CEScales = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _split(t: torch.Tensor, tokens_per_expert: List[int]):
    return torch.split(t, tokens_per_expert)


class CEExpertsMixin:
    """Shared CE math; subclasses provide the three projections for grouped rows.

    Constructor and forward keyword arguments that newer megatron-core releases pass (compat: `name`,
    the NCCL-EP `output_buffer` / `grad_input_buffer`) go to the parent unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        option = compat.ce_unsupported_expert_option(self.config)
        if option is not None:  # CE splits fc1 into contiguous [gate | up] halves of hidden_size inputs
            raise ConfigError(f"compressed experts do not support --{option.replace('_', '-')}")

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
        ce_scales: Optional[CEScales] = None,
        **parent_kwargs,
    ):
        if ce_scales is None and self._parent_forward_ok():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs, **parent_kwargs)
        if any(parent_kwargs.get(k) is not None for k in compat.EXPERT_FORWARD_BUFFERS):
            raise NotImplementedError("compressed experts do not write into NCCL-EP zero-copy buffers")
        x = permuted_local_hidden_states
        tpe = [int(n) for n in tokens_per_expert.tolist()]
        p = permuted_probs.unsqueeze(-1)
        if ce_scales is None:
            gate, up = self._ce_fc1(x, x, tpe)
            scale = p
        else:
            c_g, c_u, c_d = ce_scales
            gate, up = self._ce_fc1(x * c_g, x * c_u, tpe)
            scale = c_d * p.to(c_d.dtype)  # probs and c_d both scale the fc2 input: one multiply
        h = self._ce_activation(gate, up, scale).to(x.dtype)
        return self._ce_fc2(h, tpe, permuted_probs), None

    def _ce_activation(self, gate, up, scale):
        cfg = self.config
        if cfg.bias_activation_fusion and cfg.activation_func is F.silu:  # megatron's SwiGLU fusion
            return ce_swiglu(gate, up, scale)
        return cfg.activation_func(gate) * up * scale

    def _parent_forward_ok(self) -> bool:
        return True

    def _ce_fc1(self, x_gate, x_up, tpe) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _ce_fc2(self, h, tpe, probs) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# SwiGLU with CE scales (config.bias_activation_fusion): silu(gate) * up * scale
# ----------------------------------------------------------------------------------------------


def _swiglu_fwd(gate, up, scale):
    return F.silu(gate) * up * scale


def _swiglu_bwd(dh, gate, up, scale):
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = dh * up * scale * sig * (1 + gate * (1 - sig))
    return d_gate, dh * silu * scale, dh * silu * up


_swiglu_fwd_fused = jit_fuser(_swiglu_fwd)
_swiglu_bwd_fused = jit_fuser(_swiglu_bwd)


class _CESwiGLU(torch.autograd.Function):
    """silu(gate) * up * scale saving only its inputs (autograd through the plain expression also
    keeps silu(gate) and silu(gate) * up: two more [rows, F] tensors per layer). One fused kernel
    each way on CUDA (megatron-core's jit_fuser, as its own fused SwiGLU); eager on CPU."""

    @staticmethod
    def forward(ctx, gate, up, scale):
        ctx.save_for_backward(gate, up, scale)
        return (_swiglu_fwd_fused if gate.is_cuda else _swiglu_fwd)(gate, up, scale)

    @staticmethod
    def backward(ctx, dh):
        gate, up, scale = ctx.saved_tensors
        d_gate, d_up, d_scale = (_swiglu_bwd_fused if dh.is_cuda else _swiglu_bwd)(dh, gate, up, scale)
        # scale broadcasts ([rows, 1] probabilities, or [rows, F] c_d * p): reduce to its shape.
        return d_gate.to(gate.dtype), d_up.to(up.dtype), d_scale.sum_to_size(scale.shape).to(scale.dtype)


def ce_swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _CESwiGLU.apply(gate, up, scale)


# ----------------------------------------------------------------------------------------------
# fc1 as two GEMMs over the gate / up halves of each expert's fused weight, without copying it
# ----------------------------------------------------------------------------------------------


def _halves(w: torch.Tensor, out_dim_first: bool):
    """(W_g, W_u) as [in, F] views of a fused fc1 weight ([2F, in] if out_dim_first, else [in, 2F])."""
    if out_dim_first:
        w_g, w_u = w.chunk(2, dim=0)
        return w_g.t(), w_u.t()
    return w.chunk(2, dim=1)


class _LoopGEMM:
    """One torch.mm per expert on [in, F] weight views (any device, any layout)."""

    @staticmethod
    def fprop(x, ws, tpe):
        return torch.cat([xe @ w for w, xe in zip(ws, _split(x, tpe))])

    @staticmethod
    def dgrad(dy, ws, tpe):
        return torch.cat([dye @ w.t() for w, dye in zip(ws, _split(dy, tpe))])

    @staticmethod
    def wgrad(x, dy, tpe, outs):
        for o, xe, dye in zip(outs, _split(x, tpe), _split(dy, tpe)):
            torch.mm(xe.t(), dye, out=o)


@functools.lru_cache(maxsize=None)
def _te_grouped_gemm():
    """Transformer Engine's general_grouped_gemm with the arguments of this TE version bound (it took
    `workspaces` up to TE 2.2 and `quantization_params` since), or None without a known TE."""
    try:
        from transformer_engine.pytorch.cpp_extensions import general_grouped_gemm
    except ImportError:
        return None
    params = inspect.signature(general_grouped_gemm).parameters
    if "quantization_params" in params:
        def extra(n):
            return {"quantization_params": [None] * n}
    elif "workspaces" in params:
        from transformer_engine.pytorch.module.base import get_multi_stream_cublas_workspace

        def extra(n):
            return {"workspaces": get_multi_stream_cublas_workspace()}
    else:
        return None

    def gemm(A, B, out, **kw):
        general_grouped_gemm(A, B, out, out_dtype=out[0].dtype, **extra(len(A)), **kw)

    return gemm


class _TEGEMM:
    """TE grouped GEMMs on [F, in] row views of [2F, in] weights (contiguous, so no copy); TE's layouts
    as in its GroupedLinear: TN forward (x W^T), NN dgrad (dy W), NT wgrad (dy^T x)."""

    @staticmethod
    def usable(x, weights, out_dim_first) -> bool:
        return (out_dim_first and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and all(w.dtype == x.dtype for w in weights) and _te_grouped_gemm() is not None)

    @staticmethod
    def fprop(x, ws, tpe):
        out = x.new_empty(x.shape[0], ws[0].shape[0])
        _te_grouped_gemm()(list(ws), list(_split(x.contiguous(), tpe)), [out], layout="TN",
                           m_splits=list(tpe), single_output=True)
        return out

    @staticmethod
    def dgrad(dy, ws, tpe):
        out = dy.new_empty(dy.shape[0], ws[0].shape[1])
        _te_grouped_gemm()(list(ws), list(_split(dy.contiguous(), tpe)), [out], layout="NN",
                           m_splits=list(tpe), grad=True, single_output=True)
        return out

    @staticmethod
    def wgrad(x, dy, tpe, outs):
        _te_grouped_gemm()(list(_split(x.contiguous(), tpe)), list(_split(dy.contiguous(), tpe)),
                           list(outs), layout="NT", m_splits=list(tpe), grad=True)
        for o, n in zip(outs, tpe):
            if n == 0:  # an expert without rows gets a zero gradient whatever the GEMM skips
                o.zero_()


def _views(w: torch.Tensor, out_dim_first: bool, te: bool):
    """The two halves as the backend reads them: [F, in] rows for TE, [in, F] otherwise."""
    if te:
        return w.chunk(2, dim=0)
    return _halves(w, out_dim_first)


class _GateUpGEMM(torch.autograd.Function):
    """Per expert e: g = x_gate_e @ W_g, u = x_up_e @ W_u, with [W_g | W_u] one fused fc1 weight.

    Reads the halves as views (no per-step weight copy) and writes each expert's weight gradient
    straight into one tensor of the fused weight's shape. Autograd through chunk/slice views of the
    weight would instead build the two halves' gradients and then copy them into a fused one: an
    extra weight-sized copy per backward.
    """

    @staticmethod
    def forward(ctx, x_gate, x_up, tpe, out_dim_first, *weights):
        te = _TEGEMM.usable(x_gate, weights, out_dim_first)
        gemm = _TEGEMM if te else _LoopGEMM
        ctx.tpe, ctx.out_dim_first, ctx.te = tpe, out_dim_first, te
        ctx.save_for_backward(x_gate, x_up, *weights)
        halves = [_views(w, out_dim_first, te) for w in weights]
        gate = gemm.fprop(x_gate, [h[0] for h in halves], tpe)
        up = gemm.fprop(x_up, [h[1] for h in halves], tpe)
        return gate, up

    @staticmethod
    def backward(ctx, d_gate, d_up):
        x_gate, x_up, *weights = ctx.saved_tensors
        tpe, odf, te = ctx.tpe, ctx.out_dim_first, ctx.te
        gemm = _TEGEMM if te else _LoopGEMM
        halves = [_views(w, odf, te) for w in weights]
        dws = [torch.empty_like(w) for w in weights]
        dw_halves = [_views(dw, odf, te) for dw in dws]
        gemm.wgrad(x_gate, d_gate, tpe, [h[0] for h in dw_halves])
        gemm.wgrad(x_up, d_up, tpe, [h[1] for h in dw_halves])
        dx_g = gemm.dgrad(d_gate, [h[0] for h in halves], tpe)
        dx_u = gemm.dgrad(d_up, [h[1] for h in halves], tpe)
        return dx_g, dx_u, None, None, *dws


def gate_up_gemm(x_gate, x_up, weights, tpe, out_dim_first: bool):
    """(x_gate @ W_g, x_up @ W_u) over experts' rows; weights: one fused fc1 weight per expert."""
    return _GateUpGEMM.apply(x_gate, x_up, tuple(tpe), out_dim_first, *weights)


class CESequentialMLP(CEExpertsMixin, SequentialMLP):
    """SequentialMLP with CE scales: one MLP module per local expert."""

    def _ce_fc1(self, x_gate, x_up, tpe):
        fc1s = [expert.linear_fc1 for expert in self.local_experts]
        gate, up = gate_up_gemm(x_gate, x_up, [fc1.weight for fc1 in fc1s], tpe, out_dim_first=True)
        if fc1s[0].bias is not None:
            f = gate.shape[-1]
            gate = gate + torch.cat([fc1.bias[:f].expand(n, f) for fc1, n in zip(fc1s, tpe)])
            up = up + torch.cat([fc1.bias[f:].expand(n, f) for fc1, n in zip(fc1s, tpe)])
        return gate, up

    def _ce_fc2(self, h, tpe, probs):
        outs = []
        for expert, he, pe in zip(self.local_experts, _split(h, tpe), _split(probs, tpe)):
            out, bias = expert.linear_fc2(he)
            if bias is not None:  # fc2 skips its bias add; weight it by p like the rest of y
                out = out + bias * pe.unsqueeze(-1).to(out.dtype)
            outs.append(out)
        return torch.cat(outs)


class CETEGroupedMLP(CEExpertsMixin, TEGroupedMLP):
    """TEGroupedMLP with CE scales (GPU with transformer-engine; weights weight0..weight{E-1}). fc1 runs
    on views of the weights (gate_up_gemm), fc2 through TE's GroupedLinear itself."""

    def _expert_weights(self, linear, name):
        return [getattr(linear, f"{name}{i}") for i in range(self.num_local_experts)]

    def _ce_fc1(self, x_gate, x_up, tpe):
        ws = self._expert_weights(self.linear_fc1, "weight")
        f = ws[0].shape[0] // 2
        gate, up = gate_up_gemm(x_gate, x_up, ws, tpe, out_dim_first=True)
        if self.config.add_bias_linear:
            bs = self._expert_weights(self.linear_fc1, "bias")
            gate = gate + torch.cat([b[:f].expand(n, f) for b, n in zip(bs, tpe)])
            up = up + torch.cat([b[f:].expand(n, f) for b, n in zip(bs, tpe)])
        return gate, up

    def _ce_fc2(self, h, tpe, probs):
        out, bias = self.linear_fc2(h, tpe)
        return self._apply_bias(out, bias, tpe, probs.unsqueeze(-1))


class TorchGroupedLinear(torch.nn.Module):
    """Plain-torch stand-in for Transformer Engine's GroupedLinear inside TEGroupedMLP, for machines
    without TE (CPU): the same parameters (weight0..weight{E-1} [out, in], bias0..), the same call
    (x, m_splits) -> (y, bias), so TEGroupedMLP and CETEGroupedMLP run their grouped code path on CPU.
    One matmul per expert. No expert tensor parallelism, no fp8, no dist-checkpoint mapping."""

    def __init__(self, num_gemms, input_size, output_size, *, config, init_method, bias, skip_bias_add,
                 is_expert=True, pg_collection=None, **_unused):  # tp_comm_buffer_name, name: TE-only
        super().__init__()
        etp = pg_collection.expt_tp.size() if pg_collection is not None else 1
        if etp != 1:
            raise ConfigError("the torch grouped experts do not support --expert-tensor-parallel-size > 1")
        self.num_gemms, self.skip_bias_add = num_gemms, skip_bias_add
        expert_parallel = config.expert_model_parallel_size > 1
        for name, shape in [("weight", (output_size, input_size))] + ([("bias", (output_size,))] if bias else []):
            for i in range(num_gemms):
                p = torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype))
                with torch.no_grad():
                    init_method(p) if name == "weight" else p.zero_()
                p.allreduce = not (is_expert and expert_parallel)  # mcore DDP: expert-data-parallel grads
                self.register_parameter(f"{name}{i}", p)
        self.use_bias = bias

    def _params(self, name):
        return [getattr(self, f"{name}{i}") for i in range(self.num_gemms)]

    def forward(self, x, m_splits):
        m_splits = [int(n) for n in m_splits]
        ws = self._params("weight")
        y = torch.cat([xe @ w.t() for w, xe in zip(ws, _split(x, m_splits))]) if ws else x
        if not self.use_bias:
            return y, None
        biases = self._params("bias")
        if self.skip_bias_add:  # TEGroupedMLP._apply_bias weights them by the router probabilities
            return y, biases
        return y + torch.cat([b.expand(n, -1) for b, n in zip(biases, m_splits)]), None


def torch_grouped_experts_spec(ce: bool = True):
    """Experts spec of TEGroupedMLP (CETEGroupedMLP when ce) on TorchGroupedLinear: grouped experts that
    run without Transformer Engine (on every supported megatron-core; the legacy grouped experts that
    did this on CPU went in 0.17)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    sub = compat.grouped_mlp_submodules(TorchGroupedLinear, TorchGroupedLinear)
    return ModuleSpec(module=CETEGroupedMLP if ce else TEGroupedMLP, submodules=sub)


#: megatron-core expert class -> its CE subclass (megatron-core <0.17 adds its legacy grouped experts).
CE_EXPERTS = {SequentialMLP: CESequentialMLP, TEGroupedMLP: CETEGroupedMLP}
# Last, so that the legacy module finds everything above when its import starts here.
compat.legacy_grouped_mlp()
