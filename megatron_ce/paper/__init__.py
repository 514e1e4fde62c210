"""Tools that check the paper's claims (arXiv 2503.00634): parameter counts, latency, throughput.

`params`: exact total / active parameter counts from the megatron-core model built on the meta device.
`configs`: the released OLMoE-1B-7B and Phi-3.5-MoE configs (embedded: no download).
"""
