"""Phi-MoE + Compressed Experts (CE) configuration for transformers (trust_remote_code).

Self-contained: imports only transformers, so it can be copied beside an exported checkpoint.
`model_type` is "phimoe_ce" (not "phimoe"): without `trust_remote_code=True` transformers refuses the
directory instead of silently building a stock Phi-MoE that ignores the `block_sparse_moe.ce.*`
tables. The weights are a Phi-MoE checkpoint (4.x names: `block_sparse_moe.gate`,
`block_sparse_moe.experts.E.w1/w2/w3`) plus the CE tables.
"""

from transformers import PhimoeConfig

CE_VARIANTS = ("ia3", "hidden")


class PhimoeCEConfig(PhimoeConfig):
    r"""PhimoeConfig plus:

    moe_ce_num_compressed (`int`, defaults to 0): k_a, the number of compressed (auxiliary) experts
        among the sparsemixer's two picks: 1 (the paper's setting: first pick main, second pick
        compressed) or 0 (stock Phi-MoE). `n_ce` is accepted as an alias.
    moe_ce_variant (`str`, defaults to "ia3"): "ia3" (theta_gate, theta_up [n, d], theta_down [n, ffn])
        or "hidden" (one theta [n, d] scaling the main expert's input).
    """

    model_type = "phimoe_ce"

    moe_ce_num_compressed: int = 0
    moe_ce_variant: str = "ia3"

    def __post_init__(self, **kwargs):
        n_ce = kwargs.pop("n_ce", None)
        if n_ce is not None and not self.moe_ce_num_compressed:
            self.moe_ce_num_compressed = int(n_ce)
        super().__post_init__(**kwargs)
        k_a, top_k = int(self.moe_ce_num_compressed or 0), int(self.num_experts_per_tok)
        if k_a and top_k != 2:
            raise ValueError(f"Phi-MoE CE needs the top-2 sparsemixer (num_experts_per_tok=2, got {top_k})")
        if not 0 <= k_a < top_k:
            raise ValueError(f"moe_ce_num_compressed={k_a} must be in [0, num_experts_per_tok={top_k})")
        if self.moe_ce_variant not in CE_VARIANTS:
            raise ValueError(f"moe_ce_variant={self.moe_ce_variant!r}; choose one of {CE_VARIANTS}")


__all__ = ["PhimoeCEConfig"]
