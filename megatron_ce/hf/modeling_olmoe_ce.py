"""OLMoE + Compressed Experts (CE) for transformers (loaded with `trust_remote_code=True`).

Implements docs/METHOD.md §1 on top of transformers' own OLMoE classes: every decoder layer's sparse MoE
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

Self-contained: imports only torch, transformers and `ce_common.py` (the CE pieces shared by every
family), all copied beside exported checkpoints.
"""

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.olmoe.modeling_olmoe import (
    OlmoeForCausalLM,
    OlmoeModel,
    OlmoePreTrainedModel,
    OlmoeSparseMoeBlock,
)

from .ce_common import CEInitMixin, CETables, run_main_experts
from .configuration_olmoe_ce import OlmoeCEConfig


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
        self.ce = CETables(config.num_experts, config.hidden_size, config.intermediate_size, config.moe_ce_variant)
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


def _install_ce_blocks(model: OlmoeModel, config) -> None:
    for layer in model.layers:
        stock = layer.mlp
        layer.mlp = OlmoeCESparseMoeBlock(config, gate=stock.gate, experts=stock.experts)


class OlmoeCEModel(CEInitMixin, OlmoeModel):
    config_class = OlmoeCEConfig
    config: OlmoeCEConfig

    def __init__(self, config: OlmoeCEConfig):
        super().__init__(config)
        _install_ce_blocks(self, config)


class OlmoeCEForCausalLM(CEInitMixin, OlmoeForCausalLM):
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

__all__ = ["OlmoeCEConfig", "OlmoeCEModel", "OlmoeCEForCausalLM", "OlmoeCESparseMoeBlock", "CETables"]
