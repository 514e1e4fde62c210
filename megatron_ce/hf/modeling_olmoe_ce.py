"""OLMoE + Compressed Experts (CE) for transformers (loaded with `trust_remote_code=True`).

Implements DESIGN.md §1 on top of transformers' own OLMoE classes: every decoder layer's sparse MoE
block is replaced by `OlmoeCESparseMoeBlock`, which keeps the stock router (`mlp.gate`) and expert
weights (`mlp.experts.gate_up_proj` [E, 2F, d] / `mlp.experts.down_proj` [E, d, F], transformers
5.x fused layout; per-expert 4.x names on disk are converted by transformers' own OLMoE conversion
mapping, registered below for these classes) and adds the CE tables `mlp.ce.*`:

  ia3 (default): ce.gate [n, d], ce.up [n, d], ce.down [n, ffn]
  hidden:        ce.hidden [n, d]

Per token: softmax router in fp32, top-k in descending order; ranks 1..k_m are main experts weighted
as the base model weights them (raw probs when norm_topk_prob=False, renormalised over the full top-k
when True); ranks k_m+1..k are auxiliary, their probs renormalised among themselves (w_j) and used to
mix the tables: c_g = Σ w_j θ_j^gate, c_u = Σ w_j θ_j^up, c_d = Σ w_j θ_j^down. Main expert e computes
    y_e = W_d((silu(W_g(x ⊙ c_g)) ⊙ W_u(x ⊙ c_u)) ⊙ c_d)            (ia3)
    y_e = W_d(silu(W_g(x ⊙ θ_tok)) ⊙ W_u(x ⊙ θ_tok)), θ_tok = Σ w_j θ_j   (hidden)
and the layer returns Σ_main p_e y_e. CE tables are ones when created and when absent from a
checkpoint (never left uninitialised). Tables are mixed in fp32.
The main experts run in one pass sorted by expert over the fused expert weights (`run_main_experts`,
`ExpertLinear`), at least as fast as the reference implementation's per-expert nn.Linear loop
(tools/bench_hf_ce_block.py).

Self-contained: imports only torch and transformers (copied beside exported checkpoints).
"""

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.olmoe.modeling_olmoe import (
    OlmoeForCausalLM,
    OlmoeModel,
    OlmoePreTrainedModel,
    OlmoeSparseMoeBlock,
)

from .configuration_olmoe_ce import OlmoeCEConfig


class OlmoeCETables(nn.Module):
    """The per-expert CE vectors of one layer (all ones at creation)."""

    def __init__(self, config):
        super().__init__()
        n, d, ffn = config.num_experts, config.hidden_size, config.intermediate_size
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


class OlmoeCESparseMoeBlock(nn.Module):
    """OLMoE sparse MoE block with Compressed Experts. Reuses the stock router and expert modules."""

    def __init__(self, config, gate: nn.Module = None, experts: nn.Module = None):
        super().__init__()
        if gate is None or experts is None:
            stock = OlmoeSparseMoeBlock(config)
            gate = stock.gate if gate is None else gate
            experts = stock.experts if experts is None else experts
        self.gate = gate
        self.experts = experts
        self.ce = OlmoeCETables(config)
        self.top_k = config.num_experts_per_tok
        self.num_compressed = int(config.moe_ce_num_compressed or 0)
        self.num_main = self.top_k - self.num_compressed
        self.num_experts = config.num_experts
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.variant = config.moe_ce_variant

    def route(self, hidden_states: torch.Tensor):
        """hidden_states [T, d] -> (main_idx [T, k_m], main_w [T, k_m] fp32, aux_idx [T, k_a], aux_w [T, k_a] fp32).

        Calls the stock router module (so `output_router_logits` recording keeps working) and
        recomputes the weights of its top-k selection in fp32."""
        router_logits, _, top_idx = self.gate(hidden_states)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_p = probs.gather(1, top_idx)  # descending: torch.topk is sorted
        if self.norm_topk_prob:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        k_m = self.num_main
        main_idx, main_w = top_idx[:, :k_m], top_p[:, :k_m]
        aux_idx, aux_p = top_idx[:, k_m:], top_p[:, k_m:]
        if self.num_compressed > 0:
            denom = aux_p.sum(-1, keepdim=True)
            # an all-zero aux mass (fp underflow) gets equal weights (as the megatron-core router)
            aux_w = torch.where(denom > 0, aux_p / denom.clamp_min(1e-30), 1.0 / self.num_compressed)
        else:
            aux_w = aux_p
        return main_idx, main_w, aux_idx, aux_w

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        x = hidden_states.reshape(-1, hidden_dim)
        main_idx, main_w, aux_idx, aux_w = self.route(x)
        c_down = None
        x_gate = x_up = x
        if self.num_compressed > 0:
            c_gate, c_up, c_down = self.ce.mix(aux_idx, aux_w)
            x_gate = (x.float() * c_gate).to(x.dtype)
            x_up = x_gate if self.variant == "hidden" else (x.float() * c_up).to(x.dtype)
        out = run_main_experts(self.experts, x_gate, x_up, c_down, main_idx, main_w)
        return out.reshape(batch_size, sequence_length, hidden_dim)


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


def _install_ce_blocks(model: OlmoeModel, config) -> None:
    for layer in model.layers:
        stock = layer.mlp
        layer.mlp = OlmoeCESparseMoeBlock(config, gate=stock.gate, experts=stock.experts)


class _CEInitMixin:
    def _init_weights(self, module):
        if isinstance(module, OlmoeCETables):
            # DESIGN §1 item 9(a): CE tables absent from a checkpoint start at exactly 1
            for p in module.parameters(recurse=False):
                init.ones_(p)
            return
        super()._init_weights(module)


class OlmoeCEModel(_CEInitMixin, OlmoeModel):
    config_class = OlmoeCEConfig
    config: OlmoeCEConfig

    def __init__(self, config: OlmoeCEConfig):
        super().__init__(config)
        _install_ce_blocks(self, config)


class OlmoeCEForCausalLM(_CEInitMixin, OlmoeForCausalLM):
    config_class = OlmoeCEConfig
    config: OlmoeCEConfig

    def __init__(self, config: OlmoeCEConfig):
        # OlmoeForCausalLM.__init__ with `self.model` an OlmoeCEModel: transformers initialises each
        # sub-model with its own `_init_weights`, so the inner model must be the CE class for missing
        # CE tables to be set to ones.
        OlmoePreTrainedModel.__init__(self, config)
        self.model = OlmoeCEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


def _register_weight_conversion():
    """transformers skips its built-in conversion mappings for custom-code classes unless they are
    registered: reuse OLMoE's (per-expert on-disk names <-> fused gate_up_proj / down_proj)."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers without conversion mappings (4.x)
        return
    mapping = get_checkpoint_conversion_mapping("olmoe")
    if mapping is None:  # pragma: no cover
        return
    # Registered for the base model only: OlmoeCEForCausalLM picks it up (scoped) through its
    # `model` sub-model, so the transforms are not applied twice.
    register_checkpoint_conversion_mapping(OlmoeCEModel.__name__, deepcopy(mapping), overwrite=True)


_register_weight_conversion()

__all__ = ["OlmoeCEConfig", "OlmoeCEModel", "OlmoeCEForCausalLM", "OlmoeCESparseMoeBlock", "OlmoeCETables"]
