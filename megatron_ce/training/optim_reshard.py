"""Optimizer state that resumes under another parallel layout (issue #15 item 6).

training/checkpoint.py saves each rank's inner torch optimizer state (rank_NNNNN.pt): exact, but only
usable under the same TP/PP/EP/DP layout. megatron-core's own optimizer checkpoint can map every state
tensor (fp32 master weight, Adam exp_avg / exp_avg_sq) onto the ShardedTensor of the model parameter
it belongs to (SHARDING_METADATA below for the distributed optimizer; the plain optimizer maps its
per-parameter state the same way), so dist_checkpointing reshards it like the weights. This module saves
and loads that form in a folder of its own, beside the weights.

Verified on CPU/gloo (tests/runtime/test_optim_reshard.py, 0.16.1 and 0.19.2): megatron-core's plain
optimizer, world 1 -> TP 2. Known limits, both inside megatron-core: (1) the distributed optimizer with
torch Adam (no TE / Apex) fails in load_parameter_state_from_fully_reshardable (KeyError 'step': it
copies every tensor of the parameter's state, Adam's step included, from a dict without one: seen on
0.16.1, and 0.19.2's _set_main_param_and_optimizer_states reads the same missing key); with
TE/Apex FusedAdam the step lives in the param groups, not tested here. (2) A ChainedOptimizer
prefixes keys with the sub-optimizer's index (chained_0., chained_1.); expert-parallel parameters get
their own sub-optimizer only when EP > 1, so EP=1 <-> EP>1 changes the keys.

The trainer (training/checkpoint.py, training/checkpoint_manager.py) writes this form into
iter_N/optimizer/ beside the exact per-rank files when `save_refusal(args)` is None, records
`saved_record` in train_state.json, and reads it back only under another layout, when `load_refusal`
(decided from that record and this run's flags, before anything is read) is None.
docs/RELIABILITY.md lists what reshards.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

#: The distributed optimizer's layout-independent checkpoint form. Not megatron-core's default,
#: "fully_sharded_model_space": its ShardedTensors carry a flattened_range, which dist_checkpointing
#: refuses in 0.16.1 and 0.19.2 alike. "fully_reshardable" gathers each parameter's state on DP rank 0
#: in model space; mem_efficient gathers over the gloo data-parallel group (the other path allocates on
#: torch.cuda.current_device(), so it cannot run on CPU).
SHARDING_METADATA: Dict[str, Any] = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def optimizer_sharded_state(optimizer, gpt_model, is_loading: bool):
    """megatron-core's sharded optimizer state, keyed by the model's checkpoint keys. gpt_model is the
    unwrapped model whose parameters the optimizer updates (the optimizer finds them by identity)."""
    return optimizer.sharded_state_dict(gpt_model.sharded_state_dict(), is_loading=is_loading,
                                        metadata=SHARDING_METADATA)


def save_optimizer_state(optimizer, gpt_model, ckpt_dir: str) -> None:
    """Collective: every rank calls it; ckpt_dir must exist and be empty."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(optimizer_sharded_state(optimizer, gpt_model, is_loading=False), ckpt_dir)


def _init_torch_adam_state(optimizer) -> None:
    """torch Adam (megatron-core's fallback without TE / Apex) creates its state at the first step,
    and megatron-core's state_dict() then needs a 'step' in every parameter's state: give each
    parameter the state torch would create, to be overwritten by the load."""
    import torch

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                state.setdefault("step", torch.tensor(0.0))
                state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def load_optimizer_state(optimizer, gpt_model, ckpt_dir: str) -> None:
    """Collective: restore a state saved by save_optimizer_state at any TP/PP/EP/DP layout."""
    from megatron.core import dist_checkpointing

    _init_torch_adam_state(optimizer)
    state = dist_checkpointing.load(optimizer_sharded_state(optimizer, gpt_model, is_loading=True), ckpt_dir)
    # The load also restores each group's settings; this run's flags win (as in training/checkpoint.py:
    # e.g. a changed --moe-ce-lr-mult), and the scheduler sets lr / wd for the resumed step.
    subs = [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
    settings = [[{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups] for inner in subs]
    optimizer.load_state_dict(state)
    for inner, kept in zip(subs, settings):
        for g, k in zip(inner.param_groups, kept):
            g.update(k)


# ----------------------------------------------------------------------------------------------
# what the trainer saves and loads in this form (the rules, in one place)
# ----------------------------------------------------------------------------------------------

_DIST_OPTIM = "--use-distributed-optimizer (megatron-core's reshardable load fails with torch Adam: KeyError 'step')"


def save_refusal(args) -> Optional[str]:
    """None when the trainer saves the optimizer in the reshardable form too; else why not."""
    if args.no_save_optim:
        return "--no-save-optim"
    if args.use_distributed_optimizer:
        return _DIST_OPTIM
    return None


def sub_optimizer_count(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def saved_record(args, optimizer) -> Dict[str, Any]:
    """train_state.json's note of the reshardable form: whether it was saved (else why not) and what a
    load must match. The number of sub-optimizers fixes megatron-core's key prefixes (chained_N.):
    expert parameters get a sub-optimizer of their own when EP > 1 (0.19.x: also when ETP != TP)."""
    return dict(saved=save_refusal(args) is None, reason=save_refusal(args),
                sub_optimizers=sub_optimizer_count(optimizer), bf16=bool(args.bf16))


def load_refusal(record: Optional[Dict[str, Any]], args, optimizer) -> Optional[str]:
    """None when this run can load the reshardable optimizer state `record` (train_state.json)
    describes; else why not. Decided before reading anything, the same on every rank."""
    if args.no_load_optim:
        return "--no-load-optim"
    if not record:
        return "the checkpoint has no reshardable optimizer state (saved before it existed)"
    if not record.get("saved"):
        return f"the checkpoint has no reshardable optimizer state, saved with {record.get('reason')}"
    if args.use_distributed_optimizer:
        return f"this run has {_DIST_OPTIM}"
    if bool(args.bf16) != bool(record.get("bf16")):
        return f"--bf16 {'added' if args.bf16 else 'removed'} (the optimizer holds other tensors)"
    now = sub_optimizer_count(optimizer)
    if now != record.get("sub_optimizers"):
        return (f"{record.get('sub_optimizers')} sub-optimizer(s) saved, {now} now: expert parameters get one of "
                "their own with --expert-model-parallel-size > 1 (0.19.x: also --expert-tensor-parallel-size != "
                "--tensor-model-parallel-size), which changes megatron-core's keys")
    return None

