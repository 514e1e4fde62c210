"""megatron-ce: Compressed Experts (arXiv 2503.00634) on megatron-core MoE layers."""

__version__ = "0.1.0"
