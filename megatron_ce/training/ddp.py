"""The model as the optimizer sees it: megatron-core's DistributedDataParallel (and Float16Module
with --bf16), plus the hooks the compressed-expert layers need under --overlap-param-gather.
"""

from __future__ import annotations

import contextlib

import torch


def wrap_model(gpt, args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    config = gpt.config
    if torch.cuda.is_available():
        # megatron-core builds some modules on the CPU whatever use_cpu_initialization says (the local
        # spec's torch norms, the router until its first forward): the whole model goes to this rank's
        # GPU, as Megatron-LM's get_model does. The device is the only difference from a CPU run.
        gpt.cuda(torch.cuda.current_device())
    module = Float16Module(config, gpt) if args.bf16 else gpt
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        bucket_size=getattr(args, "ddp_bucket_size", None),
        check_for_nan_in_grad=False)  # the loop checks the loss itself and stops cleanly
    model = DistributedDataParallel(config, ddp_config, module)
    if args.overlap_param_gather:
        gather_before_ce_layers(model)
    config.finalize_model_grads_func = finalize_model_grads  # waits for (or runs) the grad reduction
    config.no_sync_func = model.no_sync
    if args.overlap_grad_reduce:
        # As Megatron-LM (align_grad_reduce): under pipeline parallelism the 1F1B schedule launches the
        # reduction of stages other than the first after their last backward.
        config.grad_sync_func = model.start_grad_sync
    return model


def gather_before_ce_layers(model) -> None:
    """megatron-core's forward pre-hooks wait for a parameter's overlapped all-gather at the module
    that owns it, when that module's forward runs. A CE MoE layer reads some of its parameters without
    running their owner's forward: the theta tables (CompressedExperts.mix) and the experts' fc1
    weights (read directly by the CE GEMMs, megatron_ce/ce/experts.py). So every parameter of a CE
    layer is waited for when the layer's forward starts (its buckets were dispatched by then)."""
    from megatron_ce.ce.layer import CEMoELayer

    def wait_for_params(layer, *unused):
        groups = {id(g): g for g in (model.param_to_bucket_group.get(p) for p in layer.parameters()) if g is not None}
        for g in groups.values():
            g.finish_param_sync()

    for m in model.module.modules():
        if isinstance(m, CEMoELayer):
            m.register_forward_pre_hook(wait_for_params)


@contextlib.contextmanager
def params_gathered(model, args):
    """With --overlap-param-gather the distributed optimizer leaves the all-gather of the updated
    parameters to the next forward's pre-hooks, so between a step and that forward a rank holds only
    its own shard up to date. Reading weights there (checkpoint save, eval) gathers them first,
    synchronously, as Megatron-LM does; the hooks resume afterwards."""
    if not args.overlap_param_gather:
        yield
        return
    model.disable_forward_pre_hook()
    try:
        yield
    finally:
        model.enable_forward_pre_hook()
