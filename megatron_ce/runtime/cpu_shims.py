"""Monkey-patches that let megatron-core run on CPU (torch.distributed gloo, fp32,
``use_cpu_initialization=True``); 0.16.1 and 0.19.x (megatron_ce/compat.py), which differ here only
by 0.16.1's legacy grouped experts (removed in 0.17), whose patches live in
megatron_ce/legacy_grouped_mlp.py and are listed and applied here only where that module loads.

Call :func:`apply_cpu_shims` before building models (``init_parallel`` does).  It does nothing
when CUDA is available and applies the patches once otherwise.  Each patch is narrow: it
replaces one named attribute of one mcore module, and every such attribute is listed in
:data:`PATCHED_NAMES` so a test can check that the pinned mcore still has it.

The largest group of CUDA assumptions -- ``torch.cuda.current_device()`` used as a device,
``device="cuda"`` literals, CUDA streams/events/synchronize and the CUDA RNG -- is handled by
giving the affected mcore modules (and only those) a CPU view of ``torch`` as their ``torch``
global: see :class:`_CpuTorch` and ``_CUDA_TORCH_MODULES``.

Found by running: GPTModel (local spec, MoE) fwd/bwd through mcore's schedules with mcore DDP at
TP2+SP, PP2, EP2 (allgather/alltoall), expert-TP2 alltoall, TP2xPP2xEP2; legacy grouped experts;
``get_megatron_optimizer`` plain and distributed with grad clipping; dist_checkpointing
save/load.  Not covered: TE, fp8/fp16/bf16, flex dispatcher, FSDP, CUDA graphs, inference.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import sys
import threading
import types
from typing import Any, Dict, Sequence, Tuple

import torch

from megatron_ce import compat

__all__ = ["apply_cpu_shims", "define_missing_te_names", "PATCHED_NAMES", "ADDED_NAMES"]

_LOCK = threading.Lock()
_APPLIED = False

# mcore modules patched by name below.
_JIT = "megatron.core.jit"
_RANDOM = "megatron.core.tensor_parallel.random"
_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
_TORCH_NORM = "megatron.core.transformer.torch_norm"
_CLIP_GRADS = "megatron.core.optimizer.clip_grads"
_OPTIMIZER = "megatron.core.optimizer.optimizer"
_DIST_OPT = "megatron.core.optimizer.distrib_optimizer"

# megatron-core <0.17: the legacy grouped experts' patches (megatron_ce/legacy_grouped_mlp.py), else None.
_LEGACY = compat.legacy_grouped_mlp()

# ======================================================================================
# 1. A CPU view of ``torch`` for mcore modules that hard-code CUDA
# ======================================================================================

# (module, what in it needs CUDA).  Each module's ``torch`` global becomes _CpuTorch.
_CUDA_TORCH_MODULES: Sequence[Tuple[str, str]] = (
    ("megatron.core.utils", "global memory buffer etc. allocate on torch.cuda.current_device()"),
    ("megatron.core.tensor_parallel.random", "RNG tracker add()/manual_seed use the torch.cuda RNG"),
    ("megatron.core.tensor_parallel.layers", "SP all-gather buffers on torch.cuda.current_device()"),
    ("megatron.core.tensor_parallel.mappings", "collective outputs on torch.cuda.current_device()"),
    ("megatron.core.transformer.utils", "get_default_causal_mask / sliding-window mask device='cuda'"),
    ("megatron.core.transformer.moe.router", "router weight moved to torch.cuda.current_device()"),
    ("megatron.core.transformer.moe.token_dispatcher", "alltoall: torch.cuda.Stream side stream, events"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "inv_freq to current_device()"),
    ("megatron.core.pipeline_parallel.schedules", "total_num_tokens device='cuda'"),
    ("megatron.core.pipeline_parallel.p2p_communication", "recv buffers on current_device()"),
    ("megatron.core.distributed.param_and_grad_buffer", "param/grad buffers on current_device()"),
    ("megatron.core.optimizer.optimizer", "found_inf / scale tensors device='cuda'"),
    ("megatron.core.optimizer.clip_grads", "norm / overflow buffers device='cuda'"),
    ("megatron.core.dist_checkpointing.strategies.state_dict_saver", "failure flag on current_device()"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "torch.cuda.synchronize() in save"),
)

_FACTORIES = (
    "tensor as_tensor zeros ones empty full arange eye linspace randn rand randint randperm "
    "empty_strided zeros_like ones_like empty_like full_like rand_like randn_like"
).split()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a CUDA ordinal


def _cpu_factory(fn):
    """Tensor factory with ``device=<cuda>`` mapped to CPU (and pin_memory dropped)."""

    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__wrapped__ = fn
    return factory


class _NullStream:
    """torch.cuda.Stream / Event on CPU: work is already synchronous, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullStream()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_NULL_STREAM = _NullStream()


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` inside a shimmed module; names not set here fall through to torch.cuda."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` inside a shimmed module: the real torch except that tensor factories map a
    CUDA device to CPU, ``cuda.current_device()`` is the CPU device, streams/events/synchronize
    are no-ops and the "CUDA" RNG is the CPU default generator (so the mcore RNG tracker forks
    the generator CPU ops actually use)."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CpuCuda(
            current_device=lambda: torch.device("cpu"),
            Stream=_NullStream,
            Event=_NullStream,
            current_stream=lambda device=None: _NULL_STREAM,
            default_stream=lambda device=None: _NULL_STREAM,
            stream=lambda stream=None: contextlib.nullcontext(),
            synchronize=lambda device=None: None,
            get_rng_state=lambda device="cuda": torch.get_rng_state(),
            set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state),
            manual_seed=lambda seed: torch.manual_seed(seed),
        )

    def __getattr__(self, name):
        return getattr(torch, name)


# ======================================================================================
# 2. torch.compile'd mcore functions (megatron.core.jit.jit_fuser)
# ======================================================================================

# Modules that bind ``jit_fuser`` by name (plus, on megatron-core <0.17, the legacy grouped experts'
# module, which applies it at run time).
_JIT_FUSER_MODULES = (
    _JIT,
    "megatron.core.activations",
    "megatron.core.transformer.torch_norm",
    "megatron.core.transformer.attention",
    *(_LEGACY.CPU_JIT_FUSER_MODULES if _LEGACY is not None else ()),
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.utils",
    "megatron.core.fusions.fused_bias_gelu",
    "megatron.core.fusions.fused_bias_swiglu",
    "megatron.core.fusions.fused_bias_geglu",
    "megatron.core.fusions.fused_cross_entropy",
    "megatron.core.fusions.fused_pad_routing_map",
    "megatron.core.fusions.fused_weighted_squared_relu",
    "megatron.core.fusions.fused_bias_dropout",
)

# Definitions decorated with @jit_fuser at import time in mcore 0.16.1 (already torch.compile
# wrappers when the shims run).  _unwrap_compiled() restores the Python functions here and
# wherever they were imported by name.
_JIT_COMPILED: Dict[str, str] = {
    "megatron.core.activations": "squared_relu quick_gelu fast_gelu",
    "megatron.core.transformer.torch_norm": "L2Norm._norm",
    "megatron.core.transformer.attention": "Attention._apply_output_gate",
    "megatron.core.transformer.moe.router": "TopKRouter._apply_expert_bias",
    "megatron.core.transformer.moe.token_dispatcher": "MoEFlexTokenDispatcher.dispatch_preprocess",
    "megatron.core.transformer.utils": "gelu_impl erf_gelu",
    "megatron.core.fusions.fused_bias_gelu": "bias_gelu bias_gelu_back",
    "megatron.core.fusions.fused_bias_swiglu": (
        "swiglu bias_swiglu weighted_swiglu swiglu_back bias_swiglu_back weighted_swiglu_back"
    ),
    "megatron.core.fusions.fused_bias_geglu": (
        "geglu bias_geglu geglu_back bias_geglu_back quick_gelu quick_geglu weighted_quick_geglu "
        "quick_geglu_back weighted_quick_geglu_back weighted_bias_quick_geglu "
        "weighted_bias_quick_geglu_back"
    ),
    "megatron.core.fusions.fused_cross_entropy": (
        "calculate_logits_max calculate_predicted_logits calculate_cross_entropy_loss "
        "calculate_gradients"
    ),
    "megatron.core.fusions.fused_pad_routing_map": "fused_pad_routing_map",
    "megatron.core.fusions.fused_weighted_squared_relu": (
        "weighted_squared_relu _squared_relu_back weighted_squared_relu_back"
    ),
    "megatron.core.fusions.fused_bias_dropout": (
        "bias_dropout_add_fused_train bias_dropout_add_fused_inference"
    ),
}


def compiled_original(obj):
    """The Python function behind a torch.compile wrapper (also inside static/classmethod),
    else None."""
    if isinstance(obj, (staticmethod, classmethod)):
        inner = compiled_original(obj.__func__)
        return None if inner is None else type(obj)(inner)
    if isinstance(obj, types.FunctionType):
        orig = obj.__dict__.get("_torchdynamo_orig_callable")
        if isinstance(orig, types.FunctionType):
            return orig
    return None


def _unwrap_compiled() -> None:
    """Replace each torch.compile wrapper held by a loaded megatron.core module (module
    attributes, and attributes of classes defined there) by the original function."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "megatron.core" or name.startswith("megatron.core.")):
            continue
        for attr, value in list(vars(module).items()):
            orig = compiled_original(value)
            if orig is not None:
                setattr(module, attr, orig)
            elif isinstance(value, type) and value.__module__ == name:
                for cattr, cvalue in list(vars(value).items()):
                    corig = compiled_original(cvalue)
                    if corig is not None:
                        setattr(value, cattr, corig)


# ======================================================================================
# 3. Replacement functions
# ======================================================================================


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _DropCpuRngWarning(logging.Filter):
    """The RNG tracker's fork warns when the CPU RNG changes inside it; on CPU the tracked "CUDA"
    RNG *is* the CPU RNG, so every random op in a fork (dropout) would log it."""

    MESSAGE = "CPU RNG state changed within GPU RNG context"

    def filter(self, record):
        return record.getMessage() != self.MESSAGE


def _cpu_maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    """mcore's version only converts CUDA tensors, so CPU split sizes stay tensors and gloo's
    all_to_all_single rejects them; convert CPU tensors too."""
    if not torch.is_tensor(tensor):
        return tensor
    tensor = tensor.cpu()
    return tensor.numpy() if as_numpy else tensor


def _make_uneven_gather(orig):
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or input_.device.type != "cpu" or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        # gloo all_gather needs equal sizes: pad each rank's rows to the largest, trim after.
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]].copy_(input_)
        chunks = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(chunks, padded, group=group)
        return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)

    _gather_along_first_dim.__wrapped__ = orig
    return _gather_along_first_dim


def _make_uneven_reduce_scatter(orig):
    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or input_.device.type != "cpu" or group.size() == 1:
            return orig(input_, group, input_split_sizes, use_global_buffer)
        # gloo reduce_scatter needs equal sizes: all-reduce everything, keep this rank's rows.
        sizes = [int(s) for s in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    _reduce_scatter_along_first_dim.__wrapped__ = orig
    return _reduce_scatter_along_first_dim


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """mcore's clip_grad_by_total_norm_fp32 minus its ``grad.type() == 'torch.cuda.FloatTensor'``
    assertion (the dtype is checked instead)."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad" if use_decoupled_grad else "grad", None)
        if grad is None:
            continue
        assert grad.dtype in allowed, f"clip_grad_by_total_norm_fp32: grad dtype {grad.dtype}"
        grads.append(to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _cuda_type_name(param):
    def type_(dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return "torch.cuda.FloatTensor"
        return torch.Tensor.type(param, dtype, non_blocking, **kwargs)

    return type_


def _make_dist_opt_param_groups(orig_func):
    def _build_model_and_main_param_groups(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        # Sorts params by param.type() == 'torch.cuda.FloatTensor': for this call only, CPU fp32
        # params answer type() with the CUDA name (an instance attribute, removed afterwards).
        shadowed = []
        for group in opt_group_ranges:
            for p in group["params"]:
                if p.device.type == "cpu" and p.dtype == torch.float32 and "type" not in p.__dict__:
                    p.type = _cuda_type_name(p)
                    shadowed.append(p)
        try:
            return orig_func(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        finally:
            for p in shadowed:
                del p.type

    _build_model_and_main_param_groups.__wrapped__ = orig_func
    return _build_model_and_main_param_groups


def _make_norm_new(orig_new):
    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return orig_new(cls, config, hidden_size, *args, **kwargs)
        no_sp = copy.copy(config)
        no_sp.sequence_parallel = False
        norm = orig_new(cls, no_sp, hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True  # so finalize_model_grads all-reduces their grads over TP
        return norm

    __new__.__wrapped__ = orig_new
    return __new__


# ======================================================================================
# 4. The list of patched names and apply_cpu_shims()
# ======================================================================================

# Names moe_utils defines only when TransformerEngine imports but reads unguarded (e.g. the
# router's te_general_gemm with moe_router_dtype set): NameError without TE.
_MOE_UTILS_TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss fused_moe_aux_loss fused_permute fused_permute_with_probs "
    "fused_sort_chunks_by_index fused_sort_chunks_by_index_with_probs "
    "fused_topk_with_score_function fused_unpermute te_general_gemm"
).split()

#: Every existing mcore attribute apply_cpu_shims() may replace: (module, dotted attribute).
PATCHED_NAMES: Tuple[Tuple[str, str], ...] = tuple(
    dict.fromkeys(
        [(m, "jit_fuser") for m in _JIT_FUSER_MODULES]
        + [(m, a) for m, attrs in _JIT_COMPILED.items() for a in attrs.split()]
        + [(m, "torch") for m, _why in _CUDA_TORCH_MODULES]
        + [(_RANDOM, "_get_cuda_rng_state"), (_RANDOM, "_set_cuda_rng_state")]
        + [(_MOE_UTILS, "maybe_move_tensor_to_cpu"), (_DISPATCHER, "maybe_move_tensor_to_cpu")]
        + [(_MAPPINGS, "_gather_along_first_dim"), (_MAPPINGS, "_reduce_scatter_along_first_dim")]
        + [(_CLIP_GRADS, "clip_grad_by_total_norm_fp32"), (_OPTIMIZER, "clip_grad_by_total_norm_fp32")]
        + [(_DIST_OPT, "DistributedOptimizer._build_model_and_main_param_groups")]
        + [(_TORCH_NORM, "WrappedTorchNorm.__new__")]
        + list(_LEGACY.CPU_PATCHED_NAMES if _LEGACY is not None else ())
    )
)

#: Attributes set only where missing (absent without TE): (module, attribute).
ADDED_NAMES: Tuple[Tuple[str, str], ...] = tuple((_MOE_UTILS, n) for n in _MOE_UTILS_TE_NAMES)


def define_missing_te_names() -> None:
    """Not CUDA-specific (init_parallel also calls it on GPUs): without TransformerEngine,
    moe_utils leaves names it later reads undefined (router with moe_router_dtype: NameError
    on te_general_gemm).  Define the missing ones as None, which mcore treats as 'no TE'."""
    moe_utils = importlib.import_module(_MOE_UTILS)
    for name in _MOE_UTILS_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _get(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _set(module: str, attr: str, value) -> None:
    *parents, last = attr.split(".")
    obj = importlib.import_module(module)
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU once; no-op when CUDA is available.

    Returns True when the patches are in effect (applied now or earlier), False with CUDA.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _APPLIED:
            _apply()
            _APPLIED = True
    return True


def _apply() -> None:
    # torch.compile'd fusions: ~25 s compile per function on the first CPU call -> plain Python.
    noop = _get(_JIT, "noop_decorator")
    for module in _JIT_FUSER_MODULES:
        _set(module, "jit_fuser", noop)
    _unwrap_compiled()

    # torch.cuda.current_device() as a device, device="cuda", streams/events/synchronize, CUDA
    # RNG calls in these modules -> their torch global becomes the CPU view.
    cpu_torch = _CpuTorch()
    for module, _why in _CUDA_TORCH_MODULES:
        _set(module, "torch", cpu_torch)

    # RNG tracker fork/get/set read torch.cuda.default_generators -> the CPU generator.
    _set(_RANDOM, "_get_cuda_rng_state", _cpu_get_rng_state)
    _set(_RANDOM, "_set_cuda_rng_state", _cpu_set_rng_state)
    # ... whose fork() then warns on every random op inside it: drop that one message.
    logging.getLogger(_RANDOM).addFilter(_DropCpuRngWarning())

    # moe_utils leaves TE-only names undefined without TE (NameError in the router).
    define_missing_te_names()

    # alltoall dispatcher: split sizes only converted for CUDA tensors (gloo TypeError at EP>1).
    for module in (_MOE_UTILS, _DISPATCHER):
        _set(module, "maybe_move_tensor_to_cpu", _cpu_maybe_move_tensor_to_cpu)

    # gloo rejects uneven all-gather / reduce-scatter (alltoall dispatcher with expert-TP > 1).
    gather = _get(_MAPPINGS, "_gather_along_first_dim")
    _set(_MAPPINGS, "_gather_along_first_dim", _make_uneven_gather(gather))
    scatter = _get(_MAPPINGS, "_reduce_scatter_along_first_dim")
    _set(_MAPPINGS, "_reduce_scatter_along_first_dim", _make_uneven_reduce_scatter(scatter))

    # Grad clipping asserts grad.type() == 'torch.cuda.FloatTensor' (imported by name too).
    for module in (_CLIP_GRADS, _OPTIMIZER):
        _set(module, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32)

    # Distributed optimizer recognises fp32 params by param.type() == 'torch.cuda.FloatTensor'.
    dist_opt = _get(_DIST_OPT, "DistributedOptimizer")
    build = dist_opt.__dict__["_build_model_and_main_param_groups"].__func__
    dist_opt._build_model_and_main_param_groups = classmethod(_make_dist_opt_param_groups(build))

    # WrappedTorchNorm asserts sequence_parallel is off: build it and tag its weights instead.
    norm_cls = _get(_TORCH_NORM, "WrappedTorchNorm")
    norm_cls.__new__ = staticmethod(_make_norm_new(norm_cls.__dict__["__new__"].__func__))

    # The legacy grouped experts (megatron-core <0.17) need the CUDA grouped_gemm package.
    if _LEGACY is not None:
        _LEGACY.apply_cpu_patches()
