"""megatron-core expert modules that accept per-token CE scales (the "ia3" variant).

For one dispatched token row x with scales (c_g, c_u, c_d) and router weight p, a main expert computes
    p * W_d( (silu(W_g (x*c_g)) * W_u (x*c_u)) * c_d )
megatron-core fuses W_g and W_u into one fc1 GEMM; since the two halves now see different inputs, fc1
runs as two GEMMs over its gate and up halves (same FLOPs). The weights stay the parent's parameters,
so state dicts and dist checkpoints are unchanged. Without scales the parent's forward runs untouched.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe import grouped_gemm_util as gg
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

CEScales = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _split(t: torch.Tensor, tokens_per_expert: List[int]):
    return torch.split(t, tokens_per_expert)


def _use_grouped_gemm(x: torch.Tensor) -> bool:
    return x.is_cuda and gg.grouped_gemm_is_available()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
    """Rows of x grouped by expert times w[e] ([E, in, out]); grouped_gemm when it is usable."""
    if _use_grouped_gemm(x):
        return gg.ops.gmm(
            x, w.contiguous(), torch.tensor(tokens_per_expert, dtype=torch.long), trans_b=False
        )
    # unbind once: indexing w[e] per expert would make each backward build a full-size zero grad.
    outs = [xe @ we for we, xe in zip(w.unbind(0), _split(x, tokens_per_expert))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class CEExpertsMixin:
    """Shared CE math; subclasses provide the three projections for grouped rows."""

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
        ce_scales: Optional[CEScales] = None,
    ):
        if ce_scales is None and self._parent_forward_ok():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
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
        h = (self.config.activation_func(gate) * up * scale).to(x.dtype)
        return self._ce_fc2(h, tpe, permuted_probs), None

    def _parent_forward_ok(self) -> bool:
        return True

    def _ce_fc1(self, x_gate, x_up, tpe) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _ce_fc2(self, h, tpe, probs) -> torch.Tensor:
        raise NotImplementedError


def _halves(w: torch.Tensor, out_dim_first: bool):
    """(W_g, W_u) as [in, F] views of a fused fc1 weight ([2F, in] if out_dim_first, else [in, 2F])."""
    if out_dim_first:
        w_g, w_u = w.chunk(2, dim=0)
        return w_g.t(), w_u.t()
    return w.chunk(2, dim=1)


class _GateUpGEMM(torch.autograd.Function):
    """Per expert e: g = x_gate_e @ W_g, u = x_up_e @ W_u, with [W_g | W_u] one fused fc1 weight.

    Backward writes each expert's weight gradient straight into one tensor of the fused weight's
    shape. Autograd through chunk/slice views of the weight would instead build the two halves'
    gradients and then copy them into a fused one: an extra weight-sized copy per backward.
    """

    @staticmethod
    def forward(ctx, x_gate, x_up, tpe, out_dim_first, *weights):
        ctx.tpe, ctx.out_dim_first = tpe, out_dim_first
        ctx.save_for_backward(x_gate, x_up, *weights)
        gates, ups = [], []
        for w, xg, xu in zip(weights, _split(x_gate, tpe), _split(x_up, tpe)):
            w_g, w_u = _halves(w, out_dim_first)
            gates.append(xg @ w_g)
            ups.append(xu @ w_u)
        return torch.cat(gates), torch.cat(ups)

    @staticmethod
    def backward(ctx, d_gate, d_up):
        x_gate, x_up, *weights = ctx.saved_tensors
        tpe, odf = ctx.tpe, ctx.out_dim_first
        dx_g, dx_u, dws = [], [], []
        parts = zip(weights, *(_split(t, tpe) for t in (x_gate, x_up, d_gate, d_up)))
        for w, xg, xu, dg, du in parts:
            w_g, w_u = _halves(w, odf)
            dw = torch.empty_like(w)
            dw_g, dw_u = _halves(dw, odf)
            torch.mm(xg.t(), dg, out=dw_g)
            torch.mm(xu.t(), du, out=dw_u)
            dws.append(dw)
            dx_g.append(dg @ w_g.t())
            dx_u.append(du @ w_u.t())
        return torch.cat(dx_g), torch.cat(dx_u), None, None, *dws


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


class CEGroupedMLP(CEExpertsMixin, GroupedMLP):
    """Legacy GroupedMLP (grouped_gemm) with CE scales; weights are [d, E*2F] and [E*F, d].

    megatron-core's GroupedMLP.forward only runs with bf16=True; without CE scales in fp32 (CPU
    tests) the same SwiGLU math runs through our grouped path instead.
    """

    def _parent_forward_ok(self) -> bool:
        return self.config.bf16

    def _ce_fc1(self, x_gate, x_up, tpe):
        d = self.config.hidden_size
        w1 = self.weight1.view(self.num_local_experts, d, -1)
        f = w1.shape[-1] // 2
        if _use_grouped_gemm(x_gate):
            return grouped_mm(x_gate, w1[..., :f], tpe), grouped_mm(x_up, w1[..., f:], tpe)
        return gate_up_gemm(x_gate, x_up, w1.unbind(0), tpe, out_dim_first=False)

    def _ce_fc2(self, h, tpe, probs):
        w2 = self.weight2.view(self.num_local_experts, -1, self.config.hidden_size)
        return grouped_mm(h, w2, tpe)


class CETEGroupedMLP(CEExpertsMixin, TEGroupedMLP):
    """TEGroupedMLP with CE scales (GPU with transformer-engine; weights weight0..weight{E-1})."""

    def _expert_weights(self, linear, name):
        return [getattr(linear, f"{name}{i}") for i in range(self.num_local_experts)]

    def _ce_fc1(self, x_gate, x_up, tpe):
        ws = self._expert_weights(self.linear_fc1, "weight")
        f = ws[0].shape[0] // 2
        w_g = torch.stack([w[:f].t() for w in ws])
        w_u = torch.stack([w[f:].t() for w in ws])
        gate, up = grouped_mm(x_gate, w_g, tpe), grouped_mm(x_up, w_u, tpe)
        if self.config.add_bias_linear:
            bs = self._expert_weights(self.linear_fc1, "bias")
            gate = gate + torch.cat([b[:f].expand(n, f) for b, n in zip(bs, tpe)])
            up = up + torch.cat([b[f:].expand(n, f) for b, n in zip(bs, tpe)])
        return gate, up

    def _ce_fc2(self, h, tpe, probs):
        out, bias = self.linear_fc2(h, tpe)
        return self._apply_bias(out, bias, tpe, probs.unsqueeze(-1))


CE_EXPERTS = {SequentialMLP: CESequentialMLP, GroupedMLP: CEGroupedMLP, TEGroupedMLP: CETEGroupedMLP}
