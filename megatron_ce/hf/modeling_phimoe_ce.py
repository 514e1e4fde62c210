"""Phi-MoE + Compressed Experts (CE) for transformers (loaded with `trust_remote_code=True`).

Implements docs/METHOD.md §1/§3 on top of transformers' own Phi-MoE classes: every decoder layer's sparse
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

Self-contained: imports only torch, transformers and `ce_common.py` (the CE pieces shared by every
family), all copied beside exported checkpoints.
"""

from copy import deepcopy

import torch
from torch import nn
from transformers.models.phimoe.modeling_phimoe import (
    PhimoeForCausalLM,
    PhimoeModel,
    PhimoePreTrainedModel,
    PhimoeSparseMoeBlock,
)

from .ce_common import CEInitMixin, CETables, run_main_experts
from .configuration_phimoe_ce import PhimoeCEConfig


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
        self.ce = CETables(config.num_local_experts, config.hidden_size, config.intermediate_size, config.moe_ce_variant)
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




def _install_ce_blocks(model: PhimoeModel, config) -> None:
    for layer in model.layers:
        stock = layer.mlp
        layer.mlp = PhimoeCESparseMoeBlock(config, router=stock.router, experts=stock.experts)


class PhimoeCEModel(CEInitMixin, PhimoeModel):
    config_class = PhimoeCEConfig
    config: PhimoeCEConfig

    def __init__(self, config: PhimoeCEConfig):
        super().__init__(config)
        _install_ce_blocks(self, config)


class PhimoeCEForCausalLM(CEInitMixin, PhimoeForCausalLM):
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

__all__ = ["PhimoeCEConfig", "PhimoeCEModel", "PhimoeCEForCausalLM", "PhimoeCESparseMoeBlock", "CETables"]
