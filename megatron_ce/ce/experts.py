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


def _linear_halves(x_gate, x_up, weight, bias):
    """Gate and up halves of a fused [2F, d] fc1 weight applied to their own inputs."""
    w_g, w_u = weight.chunk(2, dim=0)
    b_g, b_u = bias.chunk(2) if bias is not None else (None, None)
    return F.linear(x_gate, w_g, b_g), F.linear(x_up, w_u, b_u)


class CESequentialMLP(CEExpertsMixin, SequentialMLP):
    """SequentialMLP with CE scales: one MLP module per local expert."""

    def _ce_fc1(self, x_gate, x_up, tpe):
        gates, ups = [], []
        for expert, xg, xu in zip(self.local_experts, _split(x_gate, tpe), _split(x_up, tpe)):
            fc1 = expert.linear_fc1
            g, u = _linear_halves(xg, xu, fc1.weight, fc1.bias)
            gates.append(g)
            ups.append(u)
        return torch.cat(gates), torch.cat(ups)

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
        # Per expert, chunk (not w1[..., :f]): chunk's backward is one cat, while each of the two
        # slices' backward would zero-fill and copy a weight-sized gradient.
        gates, ups = [], []
        for w, xg, xu in zip(w1.unbind(0), _split(x_gate, tpe), _split(x_up, tpe)):
            w_g, w_u = w.chunk(2, dim=1)
            gates.append(xg @ w_g)
            ups.append(xu @ w_u)
        return torch.cat(gates), torch.cat(ups)

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
