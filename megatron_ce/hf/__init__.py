"""HF (transformers) modeling code for CE models, shipped beside exported checkpoints.

`modeling_olmoe_ce.py` / `configuration_olmoe_ce.py` import only torch and transformers: the export
copies them into the checkpoint directory (`install_ce_modeling`) and registers them via `auto_map`.
"""

from megatron_ce.hf.export import CE_MODELING, base_model_type, install_ce_modeling, supported_ce_model_types

__all__ = ["CE_MODELING", "base_model_type", "install_ce_modeling", "supported_ce_model_types"]
