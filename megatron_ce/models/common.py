"""Helpers shared by the model families: reading HF configs and building a GPTModel for this rank."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Union

from megatron_ce.ce.config import ConfigError

HFConfigLike = Union[str, os.PathLike, Mapping[str, Any], Any]


def hf_config_dict(hf_config: HFConfigLike) -> Dict[str, Any]:
    """An HF config as a plain dict: from a transformers config object, a dict, a config.json path or
    a directory holding config.json."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HF config at {path}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"cannot read an HF config from {type(hf_config).__name__}")


def require(cfg: Mapping[str, Any], key: str, family: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{family} config.json lacks {key!r}")
    return cfg[key]


def rope_theta(cfg: Mapping[str, Any], default: float = 10000.0) -> float:
    """RoPE base from a transformers 5.x (`rope_parameters`) or 4.x (`rope_theta`) config."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    return float(default)


def rope_type(cfg: Mapping[str, Any]) -> str:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        return "default"
    return params.get("rope_type") or params.get("type") or "default"


def check_divisible(value: int, size: int, what: str, flag: str):
    if size > 1 and value % size != 0:
        raise ConfigError(f"{what}={value} must be divisible by {flag}={size}")


def build_gpt_model(
    config,
    layer_spec,
    model_kwargs: Dict[str, Any],
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    model_class=None,
):
    """megatron-core GPTModel (or the family's subclass `model_class`) for this rank's pipeline stage.
    Parallel state must be initialised (megatron_ce.runtime.init_parallel, which also applies the CPU
    shims when CUDA is absent)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check_divisible(model_kwargs["vocab_size"], tp, "--vocab-size", "--tensor-model-parallel-size")
    kwargs = dict(model_kwargs)
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    model = (model_class or GPTModel)(
        config=config,
        transformer_layer_spec=layer_spec,
        pre_process=pre_process,
        post_process=post_process,
        **kwargs,
    )
    check_ce_layers(model, config)
    return model


def check_ce_layers(model, config) -> None:
    """With moe_ce_num_compressed > 0 every MoE layer must be a CE layer with its theta tables: a spec
    that megatron-core changed under us (e.g. its MoE spec became a functools.partial in 0.18) would
    otherwise build plain MoE layers and train without compressed experts, silently."""
    n = getattr(config, "moe_ce_num_compressed", 0) or 0
    if n <= 0:
        return
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ce.ce.layer import CEMoELayer

    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and not (isinstance(module, CEMoELayer) and module.ce is not None):
            raise ConfigError(
                f"--moe-ce-num-compressed={n} but MoE layer {name} is a plain {type(module).__name__}: "
                "its layer spec was not made a CE spec (megatron_ce.ce.to_ce_layer_spec)"
            )


def base_gpt_layer_spec(config, *, qk_layernorm: bool, normalization: str, use_te: bool = False):
    """megatron-core's GPT layer spec (TE or local) for an MoE config; families edit a copy of it.
    Both write and read the same dist-checkpoint keys (the TE spec's): a checkpoint converted or
    trained under one --transformer-impl loads under the other."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_ce import compat
    from megatron_ce.ce.spec import with_te_checkpoint_keys

    common = dict(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        **compat.legacy_grouped_gemm_kwargs(compat.uses_legacy_grouped_gemm(config)),
    )
    if use_te:  # the TE spec takes its norm type from the config
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    return with_te_checkpoint_keys(gpt_layer_specs.get_gpt_layer_local_spec(**common, normalization=normalization))


def parallel_sizes() -> Dict[str, Any]:
    """TransformerConfig parallel fields of the initialised parallel state ({} before init); SP on
    with TP, as megatron-core's MoE requires."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    tp = ps.get_tensor_model_parallel_world_size()
    return dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=tp > 1,
    )
