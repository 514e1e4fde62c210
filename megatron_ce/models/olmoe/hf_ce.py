"""A random-init HF OLMoE model with our HF CE blocks (megatron_ce/hf/modeling_olmoe_ce.py), for the
paper latency tool (megatron_ce/paper/latency.py)."""

from typing import Any, Dict, List, Tuple


def build_hf_ce_model(cfg: Dict[str, Any]) -> Tuple[Any, List[Any]]:
    from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM

    model = OlmoeCEForCausalLM(OlmoeCEConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    return model, [layer.mlp for layer in model.model.layers]
