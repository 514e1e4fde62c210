"""Transformer-Engine spec models on a machine without Transformer Engine (dist-checkpoint keys only).

megatron-core's TE wrapper classes (megatron/core/extensions/transformer_engine.py) subclass TE modules,
so without TE they are placeholders. Here each wrapper the GPT TE spec uses is rebuilt on a stand-in
base: the methods that decide dist-checkpoint keys (`sharded_state_dict`, the grouped linear's
`_sharded_state_dict_grouped`, forwarding `__init__`s) are compiled from the INSTALLED megatron-core
source of that class (not copied), and the base creates the parameters TE's own module creates, with
TE's names:
  te.pytorch.LayerNormLinear  weight, bias (if bias), layer_norm_weight, layer_norm_bias (LayerNorm only)
  te.pytorch.Linear           weight, bias (if bias)
  te.pytorch.GroupedLinear    weight0..weight{n-1}, bias0.. (if bias)
  te.pytorch.LayerNorm/RMSNorm  weight, bias (LayerNorm only)
and, like every TE module, an `_extra_state` (fp8 metadata; a ShardedObject, not a tensor).
`use_te_standins(monkeypatch)` points mcore's TE spec provider at these classes, so mcore's own
`get_gpt_layer_with_transformer_engine_spec` (and our specs built from it) give a model with the TE
checkpoint layout. Forward is not supported.
"""

from __future__ import annotations

import ast
import copy
import functools
from typing import Sequence

import torch
from torch.nn import Parameter


class _TEModule(torch.nn.Module):
    """What every TE module has here: an `_extra_state` entry (None without fp8) and no forward."""

    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass

    def forward(self, *args, **kwargs):
        raise NotImplementedError("TE stand-in: for checkpoint keys and shapes only")


class _Linear(_TEModule):
    """te.pytorch.Linear parameters, sized as mcore's TE wrappers size them (per TP rank)."""

    parallel_mode = None  # "column" | "row"
    layer_norm = False  # LayerNormLinear

    def __init__(self, input_size, output_size, *, config, init_method=None, bias=True, skip_bias_add=False,
                 is_expert=False, tp_group=None, **_):
        from megatron.core.utils import get_tensor_model_parallel_group_if_none

        super().__init__()
        self._tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        tp = self._tp_group.size()
        out = output_size // tp if self.parallel_mode == "column" else output_size
        inp = input_size // tp if self.parallel_mode == "row" else input_size
        dt = config.params_dtype
        self.weight = Parameter(torch.empty(out, inp, dtype=dt))
        if bias:
            self.bias = Parameter(torch.empty(out, dtype=dt))
        if self.layer_norm:
            self.layer_norm_weight = Parameter(torch.empty(input_size, dtype=dt))
            if config.normalization == "LayerNorm":
                self.layer_norm_bias = Parameter(torch.empty(input_size, dtype=dt))


class _ColumnLinear(_Linear):
    parallel_mode = "column"


class _RowLinear(_Linear):
    parallel_mode = "row"


class _LayerNormColumnLinear(_ColumnLinear):
    layer_norm = True


class _GroupedLinear(_TEModule):
    """te.pytorch.GroupedLinear parameters (one weight{i} per local expert) plus the attributes
    mcore's TEGroupedLinear sets and its checkpoint methods read."""

    def __init__(self, num_gemms, input_size, output_size, *, parallel_mode, config, init_method=None, bias,
                 skip_bias_add=False, is_expert=True, tp_comm_buffer_name=None, pg_collection=None, **_):
        # **_: what newer wrappers pass on (name, megatron-core 0.18); no effect on parameters or keys
        from megatron.core.process_groups_config import ProcessGroupCollection

        super().__init__()
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self._pg_collection = pg_collection
        self._tp_group = pg_collection.expt_tp
        tp = self._tp_group.size()
        out = output_size // tp if parallel_mode == "column" else output_size
        inp = input_size // tp if parallel_mode == "row" else input_size
        self.num_gemms, self.use_bias = num_gemms, bias
        self.fp8_meta, self.fp8, self.fp8_calibration = {"fp8_checkpoint": False}, False, False
        dt = config.params_dtype
        for i in range(num_gemms):
            setattr(self, f"weight{i}", Parameter(torch.empty(out, inp, dtype=dt)))
            if bias:
                setattr(self, f"bias{i}", Parameter(torch.empty(out, dtype=dt)))


class TENormStandIn:
    """TENorm: te.pytorch.LayerNorm (weight, bias) or RMSNorm (weight), by config.normalization.
    has_residual (megatron-core 0.19: the residual-fused RMSNorm) leaves the parameters as they are."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, has_residual: bool = False):
        norm = _TEModule()
        norm.weight = Parameter(torch.empty(hidden_size, dtype=config.params_dtype))
        if config.normalization == "LayerNorm":
            norm.bias = Parameter(torch.empty(hidden_size, dtype=config.params_dtype))
        return norm


class TEDotProductAttentionStandIn(_TEModule):
    """TEDotProductAttention: no parameters, an `_extra_state`."""

    def __init__(self, *args, **kwargs):
        super().__init__()


@functools.lru_cache(maxsize=None)
def _mcore_te_source():
    import megatron.core.extensions.transformer_engine as mte

    with open(mte.__file__, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=mte.__file__)


def mcore_te_class(name: str, base: type, methods: Sequence[str]) -> type:
    """Class `name(base)` whose `methods` are those of megatron-core's TE wrapper class `name`,
    compiled from the installed source in that module's namespace (zero-argument super() works)."""
    import megatron.core.extensions.transformer_engine as mte

    found = [n for n in ast.walk(_mcore_te_source()) if isinstance(n, ast.ClassDef) and n.name == name]
    if len(found) != 1:
        raise LookupError(f"{len(found)} classes named {name} in {mte.__file__}")
    node = copy.copy(found[0])
    node.body = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in methods]
    missing = set(methods) - {n.name for n in node.body}
    if missing:
        raise LookupError(f"{name} in {mte.__file__} has no {sorted(missing)}")
    node.bases, node.keywords, node.decorator_list = [ast.Name("_StandInBase", ast.Load())], [], []
    module = ast.fix_missing_locations(ast.Module(body=[node], type_ignores=[]))
    namespace = dict(vars(mte), _StandInBase=base)
    exec(compile(module, mte.__file__, "exec"), namespace)  # noqa: S102 - megatron-core's own code
    return namespace[name]


@functools.lru_cache(maxsize=None)
def te_classes():
    """name -> stand-in class, for the names mcore's TESpecProvider uses."""
    grouped = mcore_te_class("TEGroupedLinear", _GroupedLinear, ["_sharded_state_dict_grouped", "_split_extra_state"])
    return {
        "TELayerNormColumnParallelLinear": mcore_te_class(
            "TELayerNormColumnParallelLinear", _LayerNormColumnLinear, ["sharded_state_dict"]
        ),
        "TEColumnParallelLinear": mcore_te_class("TEColumnParallelLinear", _ColumnLinear, ["sharded_state_dict"]),
        "TERowParallelLinear": mcore_te_class("TERowParallelLinear", _RowLinear, ["sharded_state_dict"]),
        "TEColumnParallelGroupedLinear": mcore_te_class(
            "TEColumnParallelGroupedLinear", grouped, ["__init__", "sharded_state_dict"]
        ),
        "TERowParallelGroupedLinear": mcore_te_class(
            "TERowParallelGroupedLinear", grouped, ["__init__", "sharded_state_dict"]
        ),
        "TENorm": TENormStandIn,
        "TEDotProductAttention": TEDotProductAttentionStandIn,
    }


def use_te_standins(monkeypatch) -> None:
    """Make megatron-core's TE spec functions (get_gpt_layer_with_transformer_engine_spec, the MoE
    module spec) build the stand-ins; undone by the monkeypatch fixture."""
    import megatron.core.extensions.transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    for name, cls in te_classes().items():
        monkeypatch.setattr(provider, name, cls)
    # TE >= 1.9 (qk norm), >= 1.7 (TE expert linears): the current TE's choices
    monkeypatch.setattr(provider, "is_te_min_version", lambda *a, **k: True)
    # gpt_layer_specs imports TESpecProvider only when TE imports
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
