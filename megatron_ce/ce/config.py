"""Megatron-style configuration of Compressed Experts (CE).

`CETransformerConfig` is megatron-core's `TransformerConfig` plus the CE fields. Every check that a
user can trip with a flag raises `ConfigError` with one line naming the flag and the rule, before
megatron-core's own (assert-based) validation runs.
"""

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

CE_VARIANTS = ("ia3", "hidden")
CE_SPLITS = ("fixed", "mass")


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
    moe_ce_split: "fixed" (k_m = k - k_a main experts for every token) or "mass" (per token, the
        smallest prefix of the ranked top-k whose share of the top-k router mass reaches
        moe_ce_main_mass runs; the rest of the top-k are compressed), bounded by moe_ce_min_main
        and moe_ce_max_main. With "mass", moe_ce_num_compressed is the most compressed experts a
        token can have, k - moe_ce_min_main (either may be given; the other is derived).
    """

    moe_ce_num_compressed: int = 0
    moe_ce_variant: str = "ia3"
    moe_ce_split: str = "fixed"
    moe_ce_main_mass: float = 0.5
    moe_ce_min_main: Optional[int] = None
    moe_ce_max_main: Optional[int] = None

    def __post_init__(self):
        validate_layout(self)
        validate_ce(self)
        super().__post_init__()

    @property
    def moe_ce_num_main(self) -> int:
        """k_m: experts per token that actually run."""
        return self.moe_router_topk - self.moe_ce_num_compressed


def dispatch_topk(cfg) -> int:
    """Expert selections per token that are dispatched: k_m (fixed split) or the most a token may run
    (mass split). Expert capacity and the dispatcher's buffer sizes count these, not the full top-k:
    compressed experts are never dispatched."""
    if getattr(cfg, "moe_ce_split", "fixed") == "mass":
        return cfg.moe_ce_max_main
    return cfg.moe_router_topk - getattr(cfg, "moe_ce_num_compressed", 0)


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
    """Rules of docs/METHOD.md §1 for the CE fields (and, for the mass split, its derived bounds)."""
    variant = getattr(cfg, "moe_ce_variant", "ia3")
    _check(
        variant in CE_VARIANTS,
        f"--moe-ce-variant={variant!r} is unknown; choose one of {', '.join(CE_VARIANTS)}",
    )
    split = getattr(cfg, "moe_ce_split", "fixed")
    _check(
        split in CE_SPLITS,
        f"--moe-ce-split={split!r} is unknown; choose one of {', '.join(CE_SPLITS)}",
    )
    if split == "mass":
        _resolve_mass_split(cfg)
    k_a = getattr(cfg, "moe_ce_num_compressed", 0)
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
        not (getattr(cfg, "moe_ce_split", "fixed") == "mass" and cfg.moe_permute_fusion),
        "--moe-permute-fusion is not supported with --moe-ce-split=mass (the fused permute needs a fixed "
        "number of dispatched experts per token)",
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
        validate_ia3_expert_options(cfg)


def validate_ia3_expert_options(cfg):
    """Expert options that the ia3 CE experts would silently skip: they run their own fc1 GEMMs and
    activation (megatron_ce/ce/experts.py), so options that live inside megatron-core's expert
    forward do not apply there. Valid with CE and honoured: --moe-permute-fusion (fixed split),
    --moe-router-fusion, the bias-SwiGLU fusion (--no-bias-swiglu-fusion turns it off),
    --gradient-accumulation-fusion (see megatron_ce/ce/experts.py), --moe-grouped-gemm."""
    rule = "is not supported with --moe-ce-variant=ia3"
    why = "(the CE experts run their own fc1 and activation)"
    _check(not getattr(cfg, "fp8", None), f"--fp8-format {rule} (the CE fc1 GEMMs run in bf16/fp16)")
    _check(not getattr(cfg, "fp4", None), f"--fp4-format {rule} (the CE fc1 GEMMs run in bf16/fp16)")
    _check(not getattr(cfg, "use_te_activation_func", False), f"--use-te-activation-func {rule} {why}")
    _check(getattr(cfg, "activation_func_clamp_value", None) is None,
           f"--activation-func-clamp-value {rule} {why}")
    _check(getattr(cfg, "glu_linear_offset", 0.0) == 0.0, f"--glu-linear-offset {rule} {why}")
    _check(not getattr(cfg, "activation_func_fp8_input_store", False),
           f"--activation-func-fp8-input-store {rule} {why}")
    recompute = getattr(cfg, "recompute_modules", None) or []
    _check(not (getattr(cfg, "recompute_granularity", None) == "selective" and "moe_act" in recompute),
           f"--recompute-modules moe_act {rule} {why}; recompute the whole layer's MoE with "
           "--recompute-modules moe")
    offload = getattr(cfg, "offload_modules", None) or []
    for module in ("expert_fc1", "moe_act"):
        _check(not (getattr(cfg, "fine_grained_activation_offloading", False) and module in offload),
               f"--offload-modules {module} {rule} {why}")
    _check(not getattr(cfg, "delay_wgrad_compute", False),
           f"--delay-wgrad-compute {rule} (the CE fc1 GEMMs compute their weight gradients in the "
           "backward pass itself)")


def _resolve_mass_split(cfg):
    """Fill moe_ce_min_main / moe_ce_max_main / moe_ce_num_compressed for --moe-ce-split=mass."""
    k = cfg.moe_router_topk
    k_a = getattr(cfg, "moe_ce_num_compressed", 0) or 0
    tau = getattr(cfg, "moe_ce_main_mass", 0.5)
    _check(0.0 <= tau <= 1.0, f"--moe-ce-main-mass={tau} must be in [0, 1]")
    min_main = getattr(cfg, "moe_ce_min_main", None)
    if min_main is None:
        min_main = k - k_a if k_a > 0 else 1
    max_main = getattr(cfg, "moe_ce_max_main", None) or k
    _check(
        1 <= min_main < k,
        f"--moe-ce-min-main={min_main} must be >= 1 and < --moe-router-topk={k}",
    )
    _check(
        min_main <= max_main <= k,
        f"--moe-ce-max-main={max_main} must be >= --moe-ce-min-main={min_main} and "
        f"<= --moe-router-topk={k}",
    )
    _check(
        k_a in (0, k - min_main),
        f"--moe-ce-num-compressed={k_a} must equal --moe-router-topk - --moe-ce-min-main "
        f"= {k - min_main} with --moe-ce-split=mass",
    )
    cfg.moe_ce_min_main, cfg.moe_ce_max_main = min_main, max_main
    cfg.moe_ce_num_compressed = k - min_main  # compressed slots per token (at most)
