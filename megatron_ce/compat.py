"""Every difference between the megatron-core releases megatron-ce supports, in one place.

Supported: megatron-core 0.16.1 (the newest that installs on Python 3.11, and the last with the legacy
GroupedMLP) and 0.19.x from 0.19.2 (Python 3.12). Anything else fails at import with one line.
Each difference below names the release that introduced it; the rest of the package uses these
names and never tests a version itself.

`MCORE_NAMES` lists every megatron-core name megatron-ce imports, subclasses, overrides or calls as a
private hook (module, dotted attribute), with the releases it exists in; tests/runtime/test_compat.py
checks it against the installed release, as it checks runtime/cpu_shims.PATCHED_NAMES.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Dict, Optional, Tuple

from megatron.core import package_info

#: Installed megatron-core as (major, minor, patch).
MCORE_VERSION: Tuple[int, int, int] = (int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH))

#: Installed megatron-core's version string, for messages (skip reasons, errors).
MCORE_VERSION_STR: str = package_info.__version__

SUPPORTED_RANGE = "megatron-core ==0.16.1 (Python 3.11) or >=0.19.2,<0.20 (Python 3.12)"


def is_supported(version: Tuple[int, int, int]) -> bool:
    # 0.17 / 0.18 are untested (they sit between the two API generations handled here).
    return tuple(version) == (0, 16, 1) or (0, 19, 2) <= tuple(version) < (0, 20, 0)


def check_supported(version: Tuple[int, int, int] = MCORE_VERSION, found: str = package_info.__version__) -> None:
    if not is_supported(version):
        raise ImportError(f"megatron-ce supports {SUPPORTED_RANGE}; found megatron-core {found}")


check_supported()

# ----------------------------------------------------------------------------------------------
# 0.17: legacy GroupedMLP (grouped_gemm package), its grouped_gemm_util module, the
# `moe_use_legacy_grouped_gemm` config field and the same-named layer-spec argument were removed.
# ----------------------------------------------------------------------------------------------

HAS_LEGACY_GROUPED_MLP: bool = MCORE_VERSION < (0, 17, 0)

if HAS_LEGACY_GROUPED_MLP:
    from megatron.core.transformer.moe import grouped_gemm_util
    from megatron.core.transformer.moe.experts import GroupedMLP
else:
    grouped_gemm_util = None
    GroupedMLP = None


def legacy_grouped_mlp():
    """megatron_ce.legacy_grouped_mlp -- CE experts, CPU stand-ins and weight reading for the legacy
    GroupedMLP -- where megatron-core has that class, else None. The rest of the package reaches the
    legacy code only through this (so it is never imported on >= 0.17)."""
    if not HAS_LEGACY_GROUPED_MLP:
        return None
    import importlib

    return importlib.import_module("megatron_ce.legacy_grouped_mlp")


def grouped_gemm_available() -> bool:
    """The grouped_gemm package's kernels are usable (only through the legacy grouped_gemm_util)."""
    return grouped_gemm_util is not None and grouped_gemm_util.grouped_gemm_is_available()


def legacy_grouped_gemm_kwargs(value: bool) -> Dict[str, bool]:
    """`moe_use_legacy_grouped_gemm=value` for TransformerConfig and the GPT layer-spec functions where
    that argument exists (<= 0.16), else {} -- and then a True value is refused: there is no legacy
    GroupedMLP to honour it."""
    if HAS_LEGACY_GROUPED_MLP:
        return {"moe_use_legacy_grouped_gemm": bool(value)}
    if value:
        raise ValueError(
            "moe_use_legacy_grouped_gemm (--moe-grouped-gemm with --transformer-impl local) needs megatron-core "
            f"<0.17; found {package_info.__version__}: use --transformer-impl transformer_engine"
        )
    return {}


def uses_legacy_grouped_gemm(config) -> bool:
    """config.moe_use_legacy_grouped_gemm, False where the field no longer exists (>= 0.17)."""
    return bool(getattr(config, "moe_use_legacy_grouped_gemm", False))


# ----------------------------------------------------------------------------------------------
# 0.18: MoE layer specs (and their experts) are functools.partial(cls, submodules=...) instead of
# ModuleSpec(module=cls, submodules=...). Both are callable and built the same way; these helpers read
# and replace the class / submodules of either kind, keeping the kind.
# ----------------------------------------------------------------------------------------------


def spec_class(spec) -> Optional[type]:
    """The class a ModuleSpec, functools.partial or class builds (None otherwise)."""
    if isinstance(spec, type):
        return spec
    if isinstance(spec, functools.partial):
        return spec.func if isinstance(spec.func, type) else None
    module = getattr(spec, "module", None)
    return module if isinstance(module, type) else None


def spec_submodules(spec):
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def replace_spec(spec, module: Optional[type] = None, submodules: Any = None):
    """A copy of a ModuleSpec or functools.partial spec with its class and/or submodules replaced."""
    if isinstance(spec, functools.partial):
        keywords = dict(spec.keywords)
        if submodules is not None:
            keywords["submodules"] = submodules
        return functools.partial(module or spec.func, *spec.args, **keywords)
    spec = copy.copy(spec)
    if module is not None:
        spec.module = module
    if submodules is not None:
        spec.submodules = submodules
    return spec


def build_spec(spec, *args, **kwargs):
    """Build a module from a ModuleSpec (callable since 0.16) or a functools.partial spec."""
    return spec(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# 0.17: TEGroupedMLP takes GroupedMLPSubmodules (linear_fc1, linear_fc2, activation_func) instead of
# MLPSubmodules.
# ----------------------------------------------------------------------------------------------


def grouped_mlp_submodules(linear_fc1, linear_fc2):
    """TEGroupedMLP's submodules with these grouped-linear builders."""
    if MCORE_VERSION < (0, 17, 0):
        from megatron.core.transformer.mlp import MLPSubmodules as cls
    else:
        from megatron.core.transformer.moe.experts import GroupedMLPSubmodules as cls
    return cls(linear_fc1=linear_fc1, linear_fc2=linear_fc2)


# ----------------------------------------------------------------------------------------------
# Constructor and forward arguments that megatron-core passes to our subclasses.
#   0.17: MoELayer(..., is_mtp_layer=) and routers(..., is_mtp_layer=)
#   0.18: MoELayer(..., name=) and the experts (..., name=)
#   0.19: MoELayer calls the experts with output_buffer= / grad_input_buffer= (NCCL-EP zero copy)
# Subclasses take **kwargs and hand them to the parent unchanged; CE refuses the expert buffers.
# ----------------------------------------------------------------------------------------------

EXPERT_FORWARD_BUFFERS = ("output_buffer", "grad_input_buffer")

# ----------------------------------------------------------------------------------------------
# TEGroupedMLP fc1 layouts CE's gate/up split cannot read (fc1 is split into [gate | up] halves):
#   0.18: moe_mlp_glu_interleave_size (gate/up interleaved in blocks),
#         moe_single_grouped_weight (one stacked `weight` instead of weight0..weight{E-1});
#   <=0.16 and later: moe_latent_size (experts run in a latent width, not hidden_size).
# ----------------------------------------------------------------------------------------------

CE_UNSUPPORTED_EXPERT_OPTIONS = ("moe_mlp_glu_interleave_size", "moe_single_grouped_weight", "moe_latent_size")


def ce_unsupported_expert_option(config) -> Optional[str]:
    """The first expert-layout option set on config that CE experts cannot run with, else None."""
    for name in CE_UNSUPPORTED_EXPERT_OPTIONS:
        if getattr(config, name, None) not in (None, False):
            return name
    return None


# ----------------------------------------------------------------------------------------------
# 0.17: moe_utils.permute without TE fusion selects rows by an argsort truncated to the dispatcher's
# num_out_tokens (0.16: masked_select, exact). The alltoall dispatcher's dropless num_out_tokens is the
# static tokens * topk, so a routing map with fewer selections per token (CE's mass split) gets extra
# rows: the dispatcher must be given the exact count there (harmless on 0.16).
# ----------------------------------------------------------------------------------------------

PERMUTE_NEEDS_EXACT_NUM_OUT_TOKENS: bool = MCORE_VERSION >= (0, 17, 0)

# ----------------------------------------------------------------------------------------------
# 0.19: dist_checkpointing.save keeps the common (non-tensor) state as a ShardedObject inside the
# torch_dist files instead of a separate common.pt (still read when present, e.g. in checkpoints
# written by 0.16.1 or by megatron_ce.convert).
# ----------------------------------------------------------------------------------------------

#: Files besides .metadata / *.distcp that a complete torch_dist checkpoint of this release has.
DIST_CKPT_EXTRA_FILES: Tuple[str, ...] = ("common.pt", "metadata.json") if MCORE_VERSION < (0, 19, 0) else ("metadata.json",)

# ----------------------------------------------------------------------------------------------
# Names megatron-ce relies on: (module, dotted attribute) -> releases it exists in ("all": both).
# ----------------------------------------------------------------------------------------------

_MOE = "megatron.core.transformer.moe"
_ALL = "all"
_LEGACY = "<0.17"

MCORE_NAMES_BY_RELEASE: Dict[Tuple[str, str], str] = {
    # version info and the modules / classes imported by name
    ("megatron.core", "package_info"): _ALL,
    ("megatron.core.package_info", "__version__"): _ALL,
    ("megatron.core", "parallel_state"): _ALL,
    ("megatron.core", "tensor_parallel"): _ALL,
    ("megatron.core", "dist_checkpointing"): _ALL,
    ("megatron.core.jit", "jit_fuser"): _ALL,
    ("megatron.core.utils", "to_local_if_dtensor"): _ALL,
    ("megatron.core.models.gpt", "GPTModel"): _ALL,
    ("megatron.core.models.gpt", "gpt_layer_specs"): _ALL,
    ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"): _ALL,
    ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_with_transformer_engine_spec"): _ALL,
    ("megatron.core.models.common.embeddings", "rope_utils"): _ALL,
    ("megatron.core.transformer.spec_utils", "ModuleSpec"): _ALL,
    ("megatron.core.transformer.spec_utils", "ModuleSpec.__call__"): _ALL,
    ("megatron.core.transformer.spec_utils", "build_module"): _ALL,
    ("megatron.core.transformer.attention", "SelfAttention"): _ALL,
    ("megatron.core.transformer.attention", "SelfAttention.get_query_key_value_tensors"): _ALL,
    ("megatron.core.transformer.attention", "Attention.forward"): _ALL,
    ("megatron.core.transformer.module", "Float16Module"): _ALL,
    ("megatron.core.transformer.transformer_config", "TransformerConfig"): _ALL,
    ("megatron.core.transformer.utils", "make_sharded_tensors_for_checkpoint"): _ALL,
    ("megatron.core.tensor_parallel", "layers"): _ALL,
    ("megatron.core.tensor_parallel.layers", "set_tensor_model_parallel_attributes"): _ALL,
    ("megatron.core.pipeline_parallel", "get_forward_backward_func"): _ALL,
    ("megatron.core.distributed", "DistributedDataParallel"): _ALL,
    ("megatron.core.distributed", "DistributedDataParallelConfig"): _ALL,
    ("megatron.core.distributed.finalize_model_grads", "finalize_model_grads"): _ALL,
    ("megatron.core.dist_checkpointing.strategies", "filesystem_async"): _ALL,
    # module-private: training/checkpoint.py gives the async writer its result queue when it has none
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue"): _ALL,
    # private: training/metrics.py reads a parameter's shard range in the distributed optimizer
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._get_model_param_range_map"): _ALL,
    ("megatron.core.dist_checkpointing.mapping", "ShardedObject"): _ALL,
    ("megatron.core.dist_checkpointing.mapping", "ShardedTensor"): _ALL,
    ("megatron.core.dist_checkpointing.mapping", "apply_factories"): _ALL,
    ("megatron.core.dist_checkpointing.dict_utils", "nested_values"): _ALL,
    ("megatron.core.optimizer", "OptimizerConfig"): _ALL,
    ("megatron.core.optimizer", "get_megatron_optimizer"): _ALL,
    ("megatron.core.optimizer", "get_standard_config_overrides"): _ALL,
    ("megatron.core.optimizer.optimizer_config", "ParamKey"): _ALL,
    ("megatron.core.optimizer.optimizer_config", "ParamPredicate"): _ALL,
    ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler"): _ALL,
    ("megatron.core.optimizer_param_scheduler", "ParamGroupOverride"): _ALL,
    ("megatron.core.optimizer_param_scheduler", "get_canonical_lr_for_logging"): _ALL,
    # MoE: classes we subclass and the hooks / private helpers our subclasses override or call
    (f"{_MOE}.moe_layer", "MoELayer"): _ALL,
    (f"{_MOE}.moe_layer", "MoELayer.route"): _ALL,
    (f"{_MOE}.moe_layer", "MoELayer.preprocess"): _ALL,
    (f"{_MOE}.moe_layer", "MoELayer.routed_experts_compute"): _ALL,
    (f"{_MOE}.router", "TopKRouter"): _ALL,
    (f"{_MOE}.router", "TopKRouter.routing"): _ALL,
    (f"{_MOE}.router", "TopKRouter.apply_z_loss"): _ALL,
    (f"{_MOE}.router", "TopKRouter.is_aux_loss_enabled"): _ALL,
    (f"{_MOE}.router", "TopKRouter._apply_aux_loss"): _ALL,
    (f"{_MOE}.router", "TopKRouter._apply_seq_aux_loss"): _ALL,
    (f"{_MOE}.router", "TopKRouter._apply_global_aux_loss"): _ALL,
    (f"{_MOE}.router", "TopKRouter._apply_expert_bias"): _ALL,
    (f"{_MOE}.experts", "SequentialMLP"): _ALL,
    (f"{_MOE}.experts", "SequentialMLP.forward"): _ALL,
    (f"{_MOE}.experts", "TEGroupedMLP"): _ALL,
    (f"{_MOE}.experts", "TEGroupedMLP.forward"): _ALL,
    (f"{_MOE}.experts", "TEGroupedMLP._apply_bias"): _ALL,
    ("megatron.core.transformer.mlp", "MLPSubmodules"): _ALL,
    (f"{_MOE}.experts", "GroupedMLPSubmodules"): ">=0.17",
    (f"{_MOE}.experts", "GroupedMLP"): _LEGACY,
    (f"{_MOE}.experts", "GroupedMLP.forward"): _LEGACY,
    (_MOE, "grouped_gemm_util"): _LEGACY,
    (f"{_MOE}.grouped_gemm_util", "grouped_gemm_is_available"): _LEGACY,
    (f"{_MOE}.grouped_gemm_util", "ops"): _LEGACY,
    (f"{_MOE}.token_dispatcher", "MoEAllGatherTokenDispatcher.dispatch_postprocess"): _ALL,
    (f"{_MOE}.token_dispatcher", "MoEAllGatherTokenDispatcher.combine_preprocess"): _ALL,
    (f"{_MOE}.token_dispatcher", "MoEAlltoAllTokenDispatcher.dispatch_postprocess"): _ALL,
    (f"{_MOE}.token_dispatcher", "MoEAlltoAllTokenDispatcher.combine_preprocess"): _ALL,
    (f"{_MOE}.moe_utils", "apply_router_token_dropping"): _ALL,
    (f"{_MOE}.moe_utils", "compute_routing_scores_for_aux_loss"): _ALL,
    (f"{_MOE}.moe_utils", "get_default_pg_collection"): _ALL,
    (f"{_MOE}.moe_utils", "clear_aux_losses_tracker"): _ALL,
}


def _in_release(releases: str) -> bool:
    if releases == _ALL:
        return True
    return HAS_LEGACY_GROUPED_MLP if releases == _LEGACY else not HAS_LEGACY_GROUPED_MLP  # ">=0.17"


#: The names above that the installed release must have.
MCORE_NAMES: Tuple[Tuple[str, str], ...] = tuple(k for k, rel in MCORE_NAMES_BY_RELEASE.items() if _in_release(rel))
