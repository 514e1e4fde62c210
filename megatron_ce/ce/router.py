"""CE router: megatron-core's TopKRouter, with the top-k split into main and auxiliary experts.

The parent computes the full top-k routing exactly as the pretrained model does (scores, z-loss,
load-balancing aux loss on the full top-k selection, expert-bias counters). We then rank the k
selected experts, keep the first k_m as *main* experts with their original weights, and turn the
remaining k_a into a per-token auxiliary selection (indices + weights renormalised to sum 1).
"""

from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe.router import TopKRouter


class CERouterMixin:
    """Split of a full top-k routing into main and auxiliary experts (DESIGN.md §1 items 1-3).

    Routers with their own pick order (e.g. Phi-MoE's sparsemixer) override `rank_selected`.
    """

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
        """Returns (main_probs [T,E], main_map [T,E] bool, aux_idx [T,k_a] long, aux_w [T,k_a])."""
        k_a = self.ce_num_compressed
        ranked = self.rank_selected(probs, routing_map)
        main_idx, aux_idx = ranked[:, : self.topk - k_a], ranked[:, self.topk - k_a :]
        main_map = torch.zeros_like(routing_map).scatter_(1, main_idx, True)
        # Main experts keep the weight the base model gives them (no renormalisation).
        main_probs = probs * main_map
        aux_p = probs.gather(1, aux_idx)
        # Renormalise among the aux experts; an all-zero aux mass (fp underflow) gets equal weights.
        denom = aux_p.sum(-1, keepdim=True)
        aux_w = torch.where(denom > 0, aux_p / denom.clamp_min(1e-30), 1.0 / k_a)
        return main_probs, main_map, aux_idx, aux_w

    def route_ce(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Route and split: (main_probs, main_map, aux_idx, aux_w), tokens flattened to [T, ...]."""
        probs, routing_map = self(hidden_states, padding_mask)
        return self.split_main_aux(probs, routing_map)


class CETopKRouter(CERouterMixin, TopKRouter):
    """TopKRouter whose selection is split into main + compressed experts by `route_ce`.

    Called as a plain router (`forward`) it behaves exactly like TopKRouter.
    """
