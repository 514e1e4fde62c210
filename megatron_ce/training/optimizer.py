"""The trainer's optimizer and LR schedule: megatron-core's, with the compressed-expert tables in a
param group of their own.

megatron-core decays every parameter with two or more dimensions. The CE theta tables ([n, d], one
row per compressed expert) are 2-D, but their neutral value is 1, not 0: weight decay would pull every
compressed expert towards "switch this expert off" (theta = 0) instead of "run it unmodulated". They
are therefore never decayed, and `--moe-ce-lr-mult` scales their learning rate (the tables start at
ones and get small gradients; docs/METHOD.md). All other parameters keep megatron-core's default
rule (no decay for biases and 1-D parameters such as norms).
"""

from __future__ import annotations

import torch

CE_PREDICATE_NAME = "compressed_expert_tables"


def is_ce_table(p: torch.Tensor) -> bool:
    """The CE theta tables carry this tag from their creation (megatron_ce/ce/layer.py)."""
    return bool(getattr(p, "is_ce_table", False))


def param_group_overrides(model: torch.nn.Module, config, ce_lr_mult: float):
    """megatron-core's standard overrides (no weight decay for biases / 1-D parameters) plus: CE
    tables without weight decay and with learning rate x ce_lr_mult."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(config)
    if any(is_ce_table(p) for p in model.parameters()):
        ce = ParamGroupOverride(wd_mult=0.0)
        if ce_lr_mult != 1.0:  # with 1.0 the tables share the biases' group (same settings)
            ce["lr_mult"] = ce_lr_mult
        overrides[ParamKey(predicate=ParamPredicate(name=CE_PREDICATE_NAME, fn=is_ce_table))] = ce
    return overrides


def _scheduler_class():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class LRMultScheduler(OptimizerParamScheduler):
        """megatron-core 0.16.1's scheduler reads a group's max_lr/min_lr but ignores its lr_mult
        (Megatron-LM's older scheduler applied it); every step of the schedule, warmup included, is
        scaled here, so a group's lr is exactly lr_mult x the base schedule."""

        def get_lr(self, param_group: dict) -> float:
            return super().get_lr(param_group) * param_group.get("lr_mult", 1.0)

    return LRMultScheduler


def build_optimizer(model, args, train_iters: int):
    """(megatron-core optimizer, LR/WD scheduler) for the DDP-wrapped model."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=bool(getattr(args, "overlap_param_gather", False)))
    overrides = param_group_overrides(model, config, getattr(args, "moe_ce_lr_mult", 1.0))
    optimizer = get_megatron_optimizer(config, [model], config_overrides=overrides)
    decay = args.lr_decay_iters or train_iters
    warmup = round(args.lr_warmup_fraction * decay) if args.lr_warmup_fraction is not None else args.lr_warmup_iters
    scheduler = _scheduler_class()(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=train_iters,
        wd_incr_style="constant")
    return optimizer, scheduler


def logged_lr(optimizer) -> float:
    """The base learning rate (a group on the default schedule, not the CE group's multiple)."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return lr if lr is not None else optimizer.param_groups[0]["lr"]
