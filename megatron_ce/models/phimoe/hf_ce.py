"""A random-init HF Phi-MoE model (transformers' Phimoe) whose MoE blocks are our HF CE block with
Phi-MoE's sparsemixer router, for the paper latency tool (megatron_ce/paper/latency.py)."""

import types
from typing import Any, Dict, List, Tuple

import torch


def _ce_block_class():
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCESparseMoeBlock

    class PhimoeCEBlock(OlmoeCESparseMoeBlock):
        """Our CE block with Phi-MoE's sparsemixer router (eval): picks in order, pick weights as the
        base model's; with k_a = 1 the compressed pick's weight is 1."""

        def route(self, hidden_states):
            _, weights, idx = self.gate(hidden_states)
            k_m = self.num_main
            aux_w = torch.ones_like(weights[:, k_m:], dtype=torch.float32)
            if self.num_compressed > 1:  # pragma: no cover - sparsemixer is top-2
                aux_w = aux_w / self.num_compressed
            return idx[:, :k_m], weights[:, :k_m].float(), idx[:, k_m:], aux_w

    return PhimoeCEBlock


def build_hf_ce_model(cfg: Dict[str, Any]) -> Tuple[Any, List[Any]]:
    from transformers import PhimoeConfig, PhimoeForCausalLM

    model = PhimoeForCausalLM(PhimoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    block_settings = types.SimpleNamespace(  # what the CE block reads from its config
        num_experts=int(cfg["num_local_experts"]), hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_experts_per_tok=int(cfg["num_experts_per_tok"]),
        moe_ce_num_compressed=0, moe_ce_variant="ia3", norm_topk_prob=False)
    cls, blocks = _ce_block_class(), []
    for layer in model.model.layers:
        layer.mlp = cls(block_settings, gate=layer.mlp.router, experts=layer.mlp.experts)
        blocks.append(layer.mlp)
    return model, blocks
