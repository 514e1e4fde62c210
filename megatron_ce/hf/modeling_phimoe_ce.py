"""Phi-MoE + Compressed Experts (CE) for transformers (loaded with `trust_remote_code=True`).

Implements DESIGN.md §1/§3 on top of transformers' own Phi-MoE classes: every decoder layer's sparse
MoE block (`mlp`, on disk `block_sparse_moe`) is replaced by `PhimoeCESparseMoeBlock`, which keeps
the stock router module (`mlp.router`, on disk `block_sparse_moe.gate`) and expert weights
(`mlp.experts.gate_up_proj` [E, 2F, d] / `mlp.experts.down_proj` [E, d, F], transformers 5.x fused
layout; the 4.x per-expert names on disk are converted by transformers' own Phi-MoE conversion
mapping, registered below for these classes) and adds the CE tables `mlp.ce.*` (on disk
`block_sparse_moe.ce.*`):

  ia3 (default): ce.gate [n, d], ce.up [n, d], ce.down [n, ffn]
  hidden:        ce.hidden [n, d]

Routing is the stock `PhimoeTopKRouter` (sparsemixer, top-2, in PICK order; eval: argmax picks,
training: Gumbel sampling + 1.0/0.3333 multiplier + custom backward + input jitter, all exactly as
transformers runs them, including its jitter being applied by both the block and the router).
With moe_ce_num_compressed = 1 (the paper's setting) the FIRST pick is the main expert, weighted by
its sparsemixer weight (no renormalisation), and the SECOND pick is compressed (k_a = 1, so its aux
weight is 1): c = theta of the second pick (fp32). The main expert e computes
    y = W2((silu(W1(x ⊙ c_g)) ⊙ W3(x ⊙ c_u)) ⊙ c_d)        (ia3)
    y = W2(silu(W1(x ⊙ θ)) ⊙ W3(x ⊙ θ))                    (hidden)
and the block returns w_1 · y. With moe_ce_num_compressed = 0 it is the stock block.
CE tables are ones when created and when absent from a checkpoint (never left uninitialised).
The main experts run in one pass sorted by expert over the fused expert weights (`run_main_experts`,
`ExpertLinear`), at least as fast as the reference implementation's per-expert nn.Linear loop
(tools/bench_hf_ce_block.py).

Self-contained: imports only torch and transformers (copied beside exported checkpoints).
"""

from copy import deepcopy

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.phimoe.modeling_phimoe import (
    PhimoeForCausalLM,
    PhimoeModel,
    PhimoePreTrainedModel,
    PhimoeSparseMoeBlock,
)

from .configuration_phimoe_ce import PhimoeCEConfig


class PhimoeCETables(nn.Module):
    """The per-expert CE vectors of one layer (all ones at creation)."""

    def __init__(self, config):
        super().__init__()
        n, d, ffn = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.variant = config.moe_ce_variant
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


class PhimoeCESparseMoeBlock(nn.Module):
    """Phi-MoE sparse MoE block with Compressed Experts. Reuses the stock router and expert modules."""

    def __init__(self, config, router: nn.Module = None, experts: nn.Module = None):
        super().__init__()
        if router is None or experts is None:
            stock = PhimoeSparseMoeBlock(config)
            router = stock.router if router is None else router
            experts = stock.experts if experts is None else experts
        self.hidden_dim = config.hidden_size
        self.ffn_dim = config.intermediate_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = router
        self.experts = experts
        self.ce = PhimoeCETables(config)
        self.input_jitter_noise = config.input_jitter_noise
        self.num_compressed = int(config.moe_ce_num_compressed or 0)
        self.num_main = self.top_k - self.num_compressed
        self.variant = config.moe_ce_variant

    def route(self, hidden_states: torch.Tensor):
        """hidden_states [T, d] -> (main_idx [T, k_m], main_w [T, k_m], aux_idx [T, k_a], aux_w [T, k_a] fp32).

        The stock router module (sparsemixer; `output_router_logits` recording keeps working) gives
        the picks in pick order; the first k_m are main with their sparsemixer weights, the rest
        compressed with weights renormalised among themselves (k_a = 1: exactly 1)."""
        _, weights, selected = self.router(hidden_states)
        k_m = self.num_main
        main_idx, main_w = selected[:, :k_m], weights[:, :k_m]
        aux_idx = selected[:, k_m:]
        if self.num_compressed == 1:
            aux_w = torch.ones(aux_idx.shape, dtype=torch.float32, device=aux_idx.device)
        else:
            aux_p = weights[:, k_m:].float()
            denom = aux_p.sum(-1, keepdim=True)
            aux_w = torch.where(denom > 0, aux_p / denom.clamp_min(1e-30), 1.0 / max(self.num_compressed, 1))
        return main_idx, main_w, aux_idx, aux_w

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.training and self.input_jitter_noise > 0:  # as PhimoeSparseMoeBlock (in place)
            hidden_states *= torch.empty_like(hidden_states).uniform_(
                1.0 - self.input_jitter_noise, 1.0 + self.input_jitter_noise
            )
        x = hidden_states.reshape(-1, hidden_dim)
        main_idx, main_w, aux_idx, aux_w = self.route(x)
        if self.num_compressed == 0:
            out = self.experts(x, main_idx, main_w)
            return out.reshape(batch_size, sequence_length, hidden_dim)

        c_gate, c_up, c_down = self.ce.mix(aux_idx, aux_w)
        x_gate = (x.float() * c_gate).to(x.dtype)
        x_up = x_gate if self.variant == "hidden" else (x.float() * c_up).to(x.dtype)
        out = run_main_experts(self.experts, x_gate, x_up, c_down, main_idx, main_w)
        return out.reshape(batch_size, sequence_length, hidden_dim)


# The helpers below are the same as in modeling_olmoe_ce.py: each modeling file is copied alone beside
# an exported checkpoint (trust_remote_code), so they cannot share a module.


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


def _install_ce_blocks(model: PhimoeModel, config) -> None:
    for layer in model.layers:
        stock = layer.mlp
        layer.mlp = PhimoeCESparseMoeBlock(config, router=stock.router, experts=stock.experts)


class _CEInitMixin:
    def _init_weights(self, module):
        if isinstance(module, PhimoeCETables):
            # DESIGN §1 item 9(a): CE tables absent from a checkpoint start at exactly 1
            for p in module.parameters(recurse=False):
                init.ones_(p)
            return
        super()._init_weights(module)


class PhimoeCEModel(_CEInitMixin, PhimoeModel):
    config_class = PhimoeCEConfig
    config: PhimoeCEConfig

    def __init__(self, config: PhimoeCEConfig):
        super().__init__(config)
        _install_ce_blocks(self, config)


class PhimoeCEForCausalLM(_CEInitMixin, PhimoeForCausalLM):
    config_class = PhimoeCEConfig
    config: PhimoeCEConfig

    def __init__(self, config: PhimoeCEConfig):
        # PhimoeForCausalLM.__init__ with `self.model` a PhimoeCEModel: transformers initialises each
        # sub-model with its own `_init_weights`, so the inner model must be the CE class for missing
        # CE tables to be set to ones.
        PhimoePreTrainedModel.__init__(self, config)
        self.model = PhimoeCEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=self.config.lm_head_bias)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


def _register_weight_conversion():
    """transformers skips its built-in conversion mappings for custom-code classes unless they are
    registered: reuse Phi-MoE's (block_sparse_moe -> mlp, gate -> router, per-expert w1/w2/w3 <->
    fused gate_up_proj / down_proj); `block_sparse_moe.ce.*` on disk becomes `mlp.ce.*`."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers without conversion mappings (4.x)
        return
    mapping = get_checkpoint_conversion_mapping("phimoe")
    if mapping is None:  # pragma: no cover
        return
    # Registered for the base model only: PhimoeCEForCausalLM picks it up (scoped) through its
    # `model` sub-model, so the transforms are not applied twice.
    register_checkpoint_conversion_mapping(PhimoeCEModel.__name__, deepcopy(mapping), overwrite=True)


_register_weight_conversion()

__all__ = ["PhimoeCEConfig", "PhimoeCEModel", "PhimoeCEForCausalLM", "PhimoeCESparseMoeBlock", "PhimoeCETables"]
