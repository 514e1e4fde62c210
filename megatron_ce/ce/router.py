"""CE router: megatron-core's TopKRouter, with the top-k split into main and auxiliary experts.

The parent computes the full top-k routing exactly as the pretrained model does (scores, z-loss,
load-balancing aux loss on the full top-k selection, expert-bias counters). We then rank the k
selected experts, keep the first k_m as *main* experts with their original weights, and turn the
remaining k_a into a per-token auxiliary selection (indices + weights renormalised to sum 1).
"""

import copy
from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ce.ce.config import dispatch_topk


class CERouterMixin:
    """Split of a full top-k routing into main and auxiliary experts (docs/METHOD.md §1.1-3).

    Routers with their own pick order (e.g. Phi-MoE's sparsemixer) override `rank_selected`.

    With CE on and --moe-expert-capacity-factor set, the router keeps its own copy of the config without
    the capacity factor (the parent drops tokens per call when it reads one), and `route_ce` drops on
    the main selections with `ce_capacity_factor`. The model's shared config is never changed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ce_capacity_factor = self.config.moe_expert_capacity_factor if self.ce_num_compressed else None
        if self.ce_capacity_factor is not None:
            self.config = copy.copy(self.config)
            self.config.moe_expert_capacity_factor = None

    @property
    def ce_num_compressed(self) -> int:
        return getattr(self.config, "moe_ce_num_compressed", 0)

    def rank_selected(self, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """Indices [T, k] of the selected experts, best first (descending router weight)."""
        # -1 is below every routed weight (weights are >= 0), so unrouted experts rank last.
        ranked = probs.detach().masked_fill(~routing_map, -1.0)
        return torch.topk(ranked, self.topk, dim=-1, sorted=True).indices

    def split_main_aux(
        self, probs: torch.Tensor, routing_map: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (main_probs [T,E], main_map [T,E] bool, aux_idx [T,S] long, aux_w [T,S]).

        S = moe_ce_num_compressed slots. Fixed split: every slot is an auxiliary expert. Mass
        split: the slots are ranks k-S..k-1, and a slot whose rank runs as a main expert for this
        token has weight 0 (a token with no compressed experts has all-zero weights).
        """
        k, slots = self.topk, self.ce_num_compressed
        ranked = self.rank_selected(probs, routing_map)
        aux_idx = ranked[:, k - slots :]
        if getattr(self.config, "moe_ce_split", "fixed") == "mass":
            p_ranked = probs.gather(1, ranked)
            is_main = torch.arange(k, device=probs.device) < self.mass_num_main(p_ranked)[:, None]
            main_map = torch.zeros_like(routing_map).scatter_(1, ranked, is_main)
            is_aux = ~is_main[:, k - slots :]
            aux_p = p_ranked[:, k - slots :] * is_aux
            fallback = is_aux / is_aux.sum(-1, keepdim=True).clamp_min(1)
        else:
            main_map = torch.zeros_like(routing_map).scatter_(1, ranked[:, : k - slots], True)
            aux_p = probs.gather(1, aux_idx)
            fallback = 1.0 / slots
        # Main experts keep the weight the base model gives them (no renormalisation).
        main_probs = probs * main_map
        # Renormalise among the aux experts; an all-zero aux mass (fp underflow) gets equal weights.
        denom = aux_p.sum(-1, keepdim=True)
        aux_w = torch.where(denom > 0, aux_p / denom.clamp_min(1e-30), fallback)
        return main_probs, main_map, aux_idx, aux_w

    def mass_num_main(self, p_ranked: torch.Tensor) -> torch.Tensor:
        """Main experts per token [T]: the shortest ranked prefix holding a share >= tau of the
        top-k router mass, clamped to [moe_ce_min_main, moe_ce_max_main]."""
        cfg, k = self.config, self.topk
        if cfg.moe_ce_main_mass >= 1.0:  # exact, whatever the rounding of the cumulative sum
            n = torch.full(p_ranked.shape[:1], k, dtype=torch.long, device=p_ranked.device)
        else:
            cum = p_ranked.detach().cumsum(-1)
            n = 1 + (cum[:, :-1] < cfg.moe_ce_main_mass * cum[:, -1:]).sum(-1)
        return n.clamp(cfg.moe_ce_min_main, cfg.moe_ce_max_main)

    def route_ce(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route and split: (main_probs, main_map, aux_idx, aux_w), tokens flattened to [T, ...].

        With --moe-expert-capacity-factor, tokens are dropped (and padded) on the main selections only,
        after the split: compressed experts cost no expert capacity, and a dropped aux selection would
        change the token's compressed experts. The parent's own dropping on the full top-k is off (this
        router's config copy has no capacity factor, see the class docstring)."""
        cfg, capacity_factor = self.config, self.ce_capacity_factor
        main_probs, main_map, aux_idx, aux_w = self.split_main_aux(*self(hidden_states, padding_mask))
        if capacity_factor is None:
            return main_probs, main_map, aux_idx, aux_w
        main_probs, main_map = apply_router_token_dropping(
            main_probs, main_map, router_topk=dispatch_topk(cfg), capacity_factor=capacity_factor,
            drop_policy=cfg.moe_token_drop_policy, pad_to_capacity=cfg.moe_pad_expert_input_to_capacity)
        return main_probs, main_map, aux_idx, aux_w


class CETopKRouter(CERouterMixin, TopKRouter):
    """TopKRouter whose selection is split into main + compressed experts by `route_ce`.

    Called as a plain router (`forward`) it behaves exactly like TopKRouter, except that with CE on it
    leaves capacity dropping to `route_ce`.
    """
