"""CE MoE layer: megatron-core's MoELayer with compressed experts (docs/METHOD.md §1).

Flow per token: the CE router gives the main experts (with the base model's weights) and the k_a
auxiliary experts (indices + renormalised weights). Only main experts are dispatched.
- "hidden" variant: h <- h * sum_j w_j theta_j before dispatch; the experts are unchanged.
- "ia3" variant: the k_a indices and weights ride along as 2*k_a extra columns of the dispatched
  hidden states (0.4% more dispatch volume at OLMoE shape, instead of ~3.5x for sending the scale
  vectors); the expert side rebuilds (c_g, c_u, c_d) from its replicated theta table with one
  embedding_bag and hands them to the CE experts.
The theta tables are ordinary (non-expert) parameters, replicated on every rank: their gradients are
all-reduced over the data-parallel group like any dense weight, and tagged `sequence_parallel` so
megatron-core also sums them over tensor-parallel ranks (each TP rank sees only its tokens / its ffn
slice of theta_down).
"""

import contextlib
import copy
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_ce.ce.config import dispatch_topk, validate_ce


def param_device(config):
    """The device megatron-core's own layers (ColumnParallelLinear, VocabParallelEmbedding) create
    their parameters on: the default device with `use_cpu_initialization` (so a `torch.device(...)`
    context still applies), else `torch.cuda.current_device()` as megatron.core.tensor_parallel.layers
    sees it. Read through that module because on CUDA-less machines megatron_ce.runtime.cpu_shims
    gives it a CPU view of torch.cuda; calling torch.cuda here would fail there."""
    if config.use_cpu_initialization:
        return None
    from megatron.core.tensor_parallel import layers as mcore_tp_layers

    return mcore_tp_layers.torch.cuda.current_device()


class CompressedExperts(torch.nn.Module):
    """The theta tables of one layer: n compressed experts, initialised to ones.

    Each table is tagged `is_ce_table` so the optimizer can tell them apart (no weight decay: decay
    would pull theta toward 0, not toward its identity value 1; own learning-rate multiplier)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, variant: str, dtype, device=None):
        super().__init__()
        self.variant = variant

        def table(width):
            p = torch.nn.Parameter(torch.ones(num_experts, width, dtype=dtype, device=device))
            p.sequence_parallel = True  # grads summed over TP ranks by finalize_model_grads
            p.is_ce_table = True
            return p

        if variant == "ia3":
            self.gate = table(hidden_size)
            self.up = table(hidden_size)
            self.down = table(ffn_size)
        else:
            self.hidden = table(hidden_size)

    def reset_parameters(self):
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(1.0)

    def mix(self, aux_idx, aux_w, tables, complement: bool = False):
        """sum_j w_j * theta[idx_j] for each row, over the concatenated tables: [R, sum(widths)].

        complement: add (1 - sum_j w_j), i.e. mix in the identity (theta = 1) with the weight the
        aux experts leave over. Under the mass split a token without compressed experts has all
        weights 0 and gets c = 1 (its main experts run unmodulated); otherwise the weights sum to 1.
        """
        table = torch.cat(tables, dim=1) if len(tables) > 1 else tables[0]
        w = aux_w.to(table.dtype)
        c = F.embedding_bag(aux_idx, table, per_sample_weights=w, mode="sum")
        return c + (1 - w.sum(-1, keepdim=True)) if complement else c


class CEMoELayer(MoELayer):
    """MoELayer + compressed experts. With moe_ce_num_compressed = 0 it is MoELayer exactly."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        validate_ce(config)
        # kwargs: what newer megatron-core passes MoE layers (is_mtp_layer 0.17, name 0.18; megatron_ce/compat.py)
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        self.ce_num_compressed = getattr(config, "moe_ce_num_compressed", 0)
        self.ce_variant = getattr(config, "moe_ce_variant", "ia3")
        self.ce_complement = getattr(config, "moe_ce_split", "fixed") == "mass"
        self.ce = None
        self._ce_aux = None
        if self.ce_num_compressed > 0:
            self.ce = CompressedExperts(
                config.num_moe_experts,
                config.hidden_size,
                config.moe_ffn_hidden_size,
                self.ce_variant,
                config.params_dtype,
                param_device(config),
            )
            self.expt_tp_group = (pg_collection or self._default_pgs()).expt_tp
            self._dispatch_main_only()

    def _dispatch_main_only(self):
        """The dispatcher sizes its buffers (output token count, expert capacity when padding) from the
        top-k; only the main selections are dispatched, so it gets a config view with that count."""

        td = self.token_dispatcher
        td.config = copy.copy(td.config)  # private: the shared TransformerConfig keeps the full top-k
        self._set_dispatch_topk(dispatch_topk(self.config))
        if getattr(self.config, "moe_ce_split", "fixed") == "mass" and hasattr(td, "preprocess"):
            # Under the mass split tokens have 1..k main experts: the dispatcher's dropless
            # num_out_tokens (tokens * k) is then too large, and megatron-core >= 0.17 permutes that
            # many rows (compat.PERMUTE_NEEDS_EXACT_NUM_OUT_TOKENS). Give it the exact count.
            preprocess = td.preprocess

            def exact_preprocess(routing_map, *args, **kwargs):
                out = preprocess(routing_map, *args, **kwargs)
                if td.config.moe_expert_capacity_factor is None:
                    td.num_out_tokens = routing_map.sum()
                return out

            td.preprocess = exact_preprocess

    def _set_dispatch_topk(self, k: int) -> None:
        td = self.token_dispatcher
        td.config.moe_router_topk = k
        if hasattr(td, "router_topk"):
            td.router_topk = k

    @contextlib.contextmanager
    def full_topk(self) -> Iterator[None]:
        """Run as megatron-core's own top-k MoELayer for the duration: all k selected experts main, no
        compressed experts (self.ce is None takes the parent's route/preprocess/expert calls, identical
        to MoELayer by docs/METHOD.md §1.7) and the dispatcher sized for k again. Calibration's target."""
        ce, saved_k = self.ce, self.token_dispatcher.config.moe_router_topk
        self.ce = None
        if ce is not None:  # otherwise the dispatcher still reads the shared config, already at k
            self._set_dispatch_topk(self.config.moe_router_topk)
        try:
            yield
        finally:
            self.ce = ce
            if ce is not None:
                self._set_dispatch_topk(saved_k)

    @staticmethod
    def _default_pgs():
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        return get_default_pg_collection()

    # -- routing ---------------------------------------------------------------------------
    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self.ce is None:
            return super().route(hidden_states, padding_mask)
        probs, routing_map, aux_idx, aux_w = self.router.route_ce(hidden_states, padding_mask)
        self._ce_aux = (aux_idx, aux_w)  # consumed by preprocess() within the same forward
        return probs, routing_map

    def preprocess(self, hidden_states, probs, routing_map):
        if self.ce is None:
            return super().preprocess(hidden_states, probs, routing_map)
        (aux_idx, aux_w), self._ce_aux = self._ce_aux, None
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        if self.ce_variant == "hidden":
            scale = self.ce.mix(aux_idx, aux_w, [self.ce.hidden], self.ce_complement)
            flat = flat * scale.to(flat.dtype)
        else:
            # Integer indices are exact in fp32 and bf16 (< 256 experts) and fp16 (< 2048).
            payload = torch.cat([aux_idx.to(flat.dtype), aux_w.to(flat.dtype)], dim=-1)
            flat = torch.cat([flat, payload], dim=-1)
        hidden_states, probs = super().preprocess(
            flat.view(*shape[:-1], flat.shape[-1]), probs, routing_map
        )
        return hidden_states, probs

    # -- experts ---------------------------------------------------------------------------
    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if self.ce is None or self.ce_variant == "hidden":
            return super().routed_experts_compute(hidden_states, probs)
        td = self.token_dispatcher
        dispatched, tokens_per_expert, permuted_probs = td.dispatch_postprocess(hidden_states, probs)
        d, k_a = self.config.hidden_size, self.ce_num_compressed
        x, aux_idx, aux_w = dispatched.split([d, k_a, k_a], dim=-1)
        self._strip_payload_from_dispatcher(d)
        scales = self._ce_scales(aux_idx.detach().round().long(), aux_w)
        expert_output, mlp_bias = self.experts(x, tokens_per_expert, permuted_probs, scales)
        output = td.combine_preprocess(expert_output)
        return output, mlp_bias

    def _strip_payload_from_dispatcher(self, d: int):
        """The dispatcher recorded shapes with the payload columns; the combine path is width d."""
        td = self.token_dispatcher
        for name in ("hidden_shape", "hidden_shape_before_permute"):
            shape = getattr(td, name, None)
            if shape is not None and shape[-1] != d:
                setattr(td, name, torch.Size((*shape[:-1], d)))

    def _ce_scales(self, aux_idx, aux_w):
        """(c_g, c_u, c_d) for each dispatched row; c_d sliced to this rank's ffn shard."""
        tp, rank = self.expt_tp_group.size(), self.expt_tp_group.rank()
        f = self.config.moe_ffn_hidden_size // tp
        down = self.ce.down[:, rank * f : (rank + 1) * f] if tp > 1 else self.ce.down
        c = self.ce.mix(aux_idx, aux_w, [self.ce.gate, self.ce.up, down], self.ce_complement)
        d = self.config.hidden_size
        return c.split([d, d, f], dim=-1)
