"""Phi-MoE's top-2 sparsemixer as a megatron-core router.

Sparsemixer (`sparsemixer`, `SparseMixerRouter`): eval path is transformers' function op for op (the
mask, argmax picks, softmax over unmasked logits, no renormalisation). Training path: Gumbel sampling,
the 1.0 / 0.3333 multiplier (Heun's third-order midpoint mask, rand > 0.75) and the custom backward
(`SparseMixerMultiplier`, same as transformers' PhimoeMultiplier) -- identical algorithm; departures:
* within the router, random numbers are drawn in transformers' order (same generator state -> same
  picks, weights and gradients; tested), but relative to the rest of the model (dropout, jitter) the
  order differs, so a whole training step is not bitwise reproducible against HF;
* input jitter is applied once to the MoE block input (Microsoft's original code). transformers 5.24
  applies it twice (the block and then the router multiply the same tensor in place);
* the load-balancing loss (off unless `output_router_logits`) is megatron-core's switch aux loss on
  softmax(logits) with the softmax top-2 (HF's choice of scores and selection; mcore's normalisation);
* capacity-factor token dropping is not supported with the sparsemixer (ConfigError).
`rank_selected` (CE split) ranks by PICK ORDER (first pick is main, second is compressed), not by
weight: the sparsemixer's second weight can exceed the first.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_ce.ce import CERouterMixin
from megatron_ce.ce.config import ConfigError


class SparseMixerMultiplier(torch.autograd.Function):
    """transformers' PhimoeMultiplier: forward multiplier * mask_for_one; backward sends
    grad*multiplier * (onehot(selected) - masked_gates) to the router scores only."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected_experts, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected_experts, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_at_output):
        multiplier, selected_experts, masked_gates = ctx.saved_tensors
        grad_at_output = grad_at_output * multiplier
        grad_at_scores_expanded = masked_gates * grad_at_output.mul(-1)
        grad_at_scores_expanded.scatter_add_(dim=-1, index=selected_experts, src=grad_at_output)
        return grad_at_scores_expanded, None, None, None, None


def _sparsemixer_pick(scores, candidates, jitter_eps: float, training: bool, second: bool = False):
    """One sparsemixer pick. `candidates` is `scores` with earlier picks set to -inf (the threshold's
    denominator uses the unmasked scores, as in transformers). Random numbers are drawn exactly as
    transformers draws them (including its second pick's `rand_like(...).uniform_()`, which draws
    twice), so with the same generator state the training path is identical too."""
    with torch.no_grad():
        threshold, max_ind = candidates.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=threshold)
        mask = ((threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates = candidates.masked_fill(mask, float("-inf"))
    if training:
        gumbel = torch.empty_like(masked_gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
        selected = (masked_gates - gumbel).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected = max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier_o = masked_gates.gather(dim=-1, index=selected)
    if training:
        max_scores, max_ind = masked_gates.max(dim=-1, keepdim=True)
        rand = torch.rand_like(max_scores)
        if second:
            rand = rand.uniform_()
        mask_for_one = torch.logical_or(selected == max_ind, rand > 0.75)
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(masked_gates)
        multiplier = SparseMixerMultiplier.apply(scores, multiplier_o, selected, masked_gates, mask_for_one)
    else:
        multiplier = multiplier_o
    return multiplier, selected


def sparsemixer(scores: torch.Tensor, jitter_eps: float, training: bool):
    """Phi-MoE's top-2 sparsemixer on router logits [T, E]: (weights [T, 2], experts [T, 2]) in pick
    order (transformers' `sparsemixer`, same ops)."""
    m1, s1 = _sparsemixer_pick(scores, scores, jitter_eps, training)
    masked_scores = torch.scatter(scores, -1, s1, float("-inf"))
    m2, s2 = _sparsemixer_pick(scores, masked_scores, jitter_eps, training, second=True)
    return torch.concat((m1, m2), dim=-1), torch.concat((s1, s2), dim=-1)


class SparseMixerRouter(CERouterMixin, TopKRouter):
    """megatron-core TopKRouter whose routing is Phi-MoE's sparsemixer (top-2).

    Returns dense `probs` [T, E] (the two sparsemixer weights, zeros elsewhere) and `routing_map`.
    For CE, `rank_selected` returns the pick order of the last routing call (first pick = main).
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        # kwargs: what newer megatron-core releases pass routers (is_mtp_layer, 0.17; megatron_ce/compat.py)
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        if self.topk != 2:
            raise ConfigError("the sparsemixer router is top-2: --moe-router-topk must be 2")
        self.sparsemixer_eps = float(getattr(config, "sparsemixer_eps", 0.01))
        self._pick_order: Optional[torch.Tensor] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        weights, selected = sparsemixer(logits, self.sparsemixer_eps, self.training)
        self._pick_order = selected.detach()
        probs = torch.zeros_like(logits).scatter(1, selected, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, selected, True)

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

            routing_map_for_aux_loss, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=self.config.moe_router_fusion, padding_mask=padding_mask
            )
            with_pad = padding_mask is not None
            probs = self._apply_aux_loss(probs, scores_for_aux_loss, routing_map_for_aux_loss, with_padding_mask=with_pad)
            probs = self._apply_seq_aux_loss(
                probs, scores_for_aux_loss, routing_map_for_aux_loss, seq_length, bsz, with_padding_mask=with_pad
            )
            probs = self._apply_global_aux_loss(
                probs, scores_for_aux_loss, routing_map_for_aux_loss, with_padding_mask=with_pad
            )
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def rank_selected(self, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        order = self._pick_order
        if order is None or order.shape[0] != probs.shape[0]:
            raise RuntimeError("SparseMixerRouter.rank_selected needs the routing of the same forward")
        return order
