"""HF (transformers) modeling code for CE models, shipped beside exported checkpoints.

`modeling_<family>_ce.py` / `configuration_<family>_ce.py` and `ce_common.py` (the CE tables and expert
computation every family shares) import only torch and transformers: the export copies them into the
checkpoint directory (`install_ce_modeling`) and registers them via `auto_map`.
"""

from megatron_ce.hf.export import CE_MODELING, base_model_type, install_ce_modeling, supported_ce_model_types

__all__ = ["CE_MODELING", "base_model_type", "install_ce_modeling", "supported_ce_model_types"]
