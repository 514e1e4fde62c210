"""The Compressed-Experts pieces shared by the HF CE modeling files of every family (OLMoE, Phi-MoE).

Shipped beside exported checkpoints together with `modeling_<family>_ce.py`, which imports it
relatively (transformers copies relative imports of remote code). Imports only torch and transformers.
The method: docs/METHOD.md §1 of the megatron-ce repository.
"""

import torch
from torch import nn
from transformers import initialization as init


class CETables(nn.Module):
    """The per-expert CE vectors of one layer (all ones at creation)."""

    def __init__(self, n: int, d: int, ffn: int, variant: str):
        super().__init__()
        self.variant = variant
        if self.variant == "ia3":
            self.gate = nn.Parameter(torch.ones(n, d))
            self.up = nn.Parameter(torch.ones(n, d))
            self.down = nn.Parameter(torch.ones(n, ffn))
        elif self.variant == "hidden":
            self.hidden = nn.Parameter(torch.ones(n, d))
        else:
            raise ValueError(f"unknown moe_ce_variant {self.variant!r}")

    def mix(self, aux_idx: torch.Tensor, aux_w: torch.Tensor):
        """(c_gate [T, d], c_up [T, d], c_down [T, ffn] or None), fp32, from aux indices/weights [T, k_a]."""

        def c(table):
            return torch.einsum("ta,tad->td", aux_w.float(), table[aux_idx].float())

        if self.variant == "ia3":
            return c(self.gate), c(self.up), c(self.down)
        theta = c(self.hidden)
        return theta, theta, None

    def extra_repr(self):
        return f"variant={self.variant}"


def _weight_part(weight: torch.Tensor, i: int, parts: int, transposed: bool, interleaved: bool):
    """Part i of `parts` equal parts of the output features of fused expert weights: [E, R, K] rows
    (or [E, K, R] columns when transposed), contiguous blocks or interleaved (gate0, up0, gate1, ...)."""
    size = weight.shape[2 if transposed else 1] // parts
    idx = slice(i, None, parts) if interleaved else slice(i * size, (i + 1) * size)
    return weight[:, :, idx] if transposed else weight[:, idx]


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b without a temporary when the dtypes agree (b: a weight, possibly another dtype)."""
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


class ExpertLinear(torch.autograd.Function):
    """ys[i][rows of e] = xs[i][rows of e] @ (part i of expert e's weight)^T for each expert e, the rows
    of every x sorted by expert (`counts` rows per expert, in expert order).

    The backward writes each expert's weight gradient straight into one gradient of the fused
    weight. Autograd through per-expert views of a fused [E, ...] parameter costs far more: indexing
    it per expert allocates and zeroes a full [E, ...] gradient for every expert (44% of a training
    step in a profile), and unbind/chunk views copy the parts together again."""

    @staticmethod
    def forward(ctx, weight, counts, parts, transposed, interleaved, *xs):
        ctx.save_for_backward(weight, *xs)
        ctx.layout = (counts, parts, transposed, interleaved)
        ys = []
        for i, x in enumerate(xs):
            w = _weight_part(weight, i, parts, transposed, interleaved)
            y = x.new_empty(x.shape[0], w.shape[2] if transposed else w.shape[1])
            start = 0
            for e, n in enumerate(counts):
                if n:
                    _mm_into(y[start : start + n], x[start : start + n], w[e] if transposed else w[e].t())
                    start += n
            ys.append(y)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        weight, *xs = ctx.saved_tensors
        counts, parts, transposed, interleaved = ctx.layout
        need_w = ctx.needs_input_grad[0]
        grad_w = torch.empty_like(weight) if need_w else None
        grad_xs = []
        for i, (x, g) in enumerate(zip(xs, grads)):
            w = _weight_part(weight, i, parts, transposed, interleaved)
            gw = _weight_part(grad_w, i, parts, transposed, interleaved) if need_w else None
            gx = torch.empty_like(x) if ctx.needs_input_grad[5 + i] else None
            start = 0
            for e, n in enumerate(counts):
                if n == 0:
                    if need_w:
                        gw[e].zero_()  # an expert without tokens gets a zero gradient
                    continue
                rows = slice(start, start + n)
                start += n
                if gx is not None:
                    _mm_into(gx[rows], g[rows], w[e].t() if transposed else w[e])
                if need_w:
                    if transposed:
                        _mm_into(gw[e], x[rows].t(), g[rows])
                    else:
                        _mm_into(gw[e], g[rows].t(), x[rows])
            grad_xs.append(gx)
        return (grad_w, None, None, None, None, *grad_xs)


def run_main_experts(experts, x_gate, x_up, c_down, main_idx, main_w):
    """sum over each token's main experts e of p_e * W_d^e((act(W_g^e x_gate) * W_u^e x_up) * c_down).

    The token copies are sorted by expert once (one gather in, one index_add out); each expert
    multiplies its contiguous block of rows and the elementwise work runs once over all rows.
    The reference block's per-expert masks, gathers, scatters and elementwise ops cost more than
    the expert matmuls at small batch and in decoding."""
    num_experts = experts.gate_up_proj.shape[0]
    flat = main_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // main_idx.shape[1]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    # index_select, not x[tok]: its backward is an index_add, several times faster on CPU than the
    # accumulating index_put of advanced indexing
    xs_gate = x_gate.index_select(0, tok)
    xs_up = xs_gate if x_up is x_gate else x_up.index_select(0, tok)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    dtype = _autocast_dtype(x_gate.device.type)
    if dtype is not None:  # ExpertLinear's matmuls (out=) bypass autocast: cast as autocast's linear would
        xs_gate, xs_up, gate_up, down = xs_gate.to(dtype), xs_up.to(dtype), gate_up.to(dtype), down.to(dtype)
    transposed = bool(getattr(experts, "is_transposed", False))
    interleaved = not getattr(experts, "is_concatenated", True)
    g, u = ExpertLinear.apply(gate_up, counts, 2, transposed, interleaved, xs_gate, xs_up)
    h = experts.act_fn(g) * u
    if c_down is not None:
        h = (h.float() * c_down.index_select(0, tok)).to(h.dtype)
    (y,) = ExpertLinear.apply(down, counts, 1, transposed, False, h)
    y = y * main_w.reshape(-1).index_select(0, order).unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x_gate).index_add_(0, tok, y.to(x_gate.dtype))


def _autocast_dtype(device_type: str):
    """The autocast dtype active for this device type, else None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: no per-device query
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


class CEInitMixin:
    def _init_weights(self, module):
        if isinstance(module, CETables):
            # docs/METHOD.md §1.9(a): CE tables absent from a checkpoint start at exactly 1
            for p in module.parameters(recurse=False):
                init.ones_(p)
            return
        super()._init_weights(module)
