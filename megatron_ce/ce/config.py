"""Megatron-style configuration of Compressed Experts (CE).

`CETransformerConfig` is megatron-core's `TransformerConfig` plus the CE fields. Every check that a
user can trip with a flag raises `ConfigError` with one line naming the flag and the rule, before
megatron-core's own (assert-based) validation runs.
"""

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

CE_VARIANTS = ("ia3", "hidden")


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class CETransformerConfig(TransformerConfig):
    """TransformerConfig with Compressed-Experts options.

    moe_ce_num_compressed: k_a, the number of top-k experts per token that act as compressed
        experts instead of running (the reference code's `n_ce`); 0 disables CE.
    moe_ce_variant: "ia3" (default; what the released code trains: per-expert vectors scaling the
        gate-, up- and down-projection inputs) or "hidden" (the paper's equation: one vector per
        expert scaling the hidden state before the main experts).
    """

    moe_ce_num_compressed: int = 0
    moe_ce_variant: str = "ia3"

    def __post_init__(self):
        validate_layout(self)
        validate_ce(self)
        super().__post_init__()

    @property
    def moe_ce_num_main(self) -> int:
        """k_m: experts per token that actually run."""
        return self.moe_router_topk - self.moe_ce_num_compressed


def _check(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


def validate_layout(cfg: TransformerConfig):
    """Parallel layout rules that megatron-core only asserts (or checks late)."""
    tp = cfg.tensor_model_parallel_size
    pp = cfg.pipeline_model_parallel_size
    ep = cfg.expert_model_parallel_size
    _check(
        cfg.num_attention_heads % tp == 0,
        f"--num-attention-heads={cfg.num_attention_heads} must be divisible by "
        f"--tensor-model-parallel-size={tp}",
    )
    if cfg.num_query_groups is not None:
        _check(
            cfg.num_query_groups % tp == 0,
            f"--num-query-groups={cfg.num_query_groups} must be divisible by "
            f"--tensor-model-parallel-size={tp}",
        )
    _check(
        cfg.num_layers % pp == 0,
        f"--num-layers={cfg.num_layers} must be divisible by --pipeline-model-parallel-size={pp}",
    )
    if cfg.num_moe_experts is not None:
        _check(
            cfg.num_moe_experts % ep == 0,
            f"--num-experts={cfg.num_moe_experts} must be divisible by "
            f"--expert-model-parallel-size={ep}",
        )
    _check(
        tp == 1 or cfg.num_moe_experts is None or cfg.sequence_parallel,
        f"--tensor-model-parallel-size={tp} with MoE requires --sequence-parallel",
    )


def validate_ce(cfg: TransformerConfig):
    """Rules of DESIGN.md §1 for the CE fields."""
    k_a = getattr(cfg, "moe_ce_num_compressed", 0)
    variant = getattr(cfg, "moe_ce_variant", "ia3")
    _check(
        variant in CE_VARIANTS,
        f"--moe-ce-variant={variant!r} is unknown; choose one of {', '.join(CE_VARIANTS)}",
    )
    _check(k_a >= 0, f"--moe-ce-num-compressed={k_a} must be >= 0")
    if k_a == 0:
        return
    _check(cfg.num_moe_experts is not None, "--moe-ce-num-compressed needs --num-experts (an MoE)")
    k = cfg.moe_router_topk
    _check(
        k_a < k,
        f"--moe-ce-num-compressed={k_a} must be < --moe-router-topk={k} "
        "(at least one main expert per token)",
    )
    _check(
        cfg.moe_router_load_balancing_type != "sinkhorn",
        "--moe-router-load-balancing-type=sinkhorn is not supported with --moe-ce-num-compressed",
    )
    _check(
        cfg.moe_expert_capacity_factor is None,
        "--moe-expert-capacity-factor is not supported with --moe-ce-num-compressed yet "
        "(token dropping must apply to main experts only)",
    )
    _check(
        not cfg.moe_apply_probs_on_input,
        "--moe-apply-probs-on-input is not supported with --moe-ce-num-compressed",
    )
    _check(
        cfg.moe_latent_size is None, "--moe-latent-size is not supported with --moe-ce-num-compressed"
    )
    if variant == "ia3":
        _check(
            not cfg.moe_shared_expert_overlap,
            "--moe-shared-expert-overlap is not supported with --moe-ce-variant=ia3",
        )
        _check(
            cfg.gated_linear_unit and cfg.activation_func is F.silu,
            "--moe-ce-variant=ia3 needs SwiGLU experts (--swiglu)",
        )
