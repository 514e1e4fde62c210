"""Every parameter of a built model is created where megatron-core creates its own (issue 12 item 3).

megatron-core allocates its tensor-parallel layers' weights (embedding, linear_qkv, experts, ...) on
`torch.cuda.current_device()` with `config.params_dtype` unless `use_cpu_initialization`. Our own
parameters (CE theta tables, OLMoE's full-width QK-norm) must follow the same rule, or a GPU run ends
up with CPU parameters. To see that on a CPU machine, the test points the device megatron-core
resolves at `meta` by patching exactly what megatron_ce.runtime.cpu_shims patches (each listed mcore
module's `torch` view), then compares every parameter with megatron-core's own ones.
"""

import importlib

import pytest
import torch

from megatron_ce.runtime import cpu_shims
from tests.models.families import FAMILIES


class _MetaDeviceTorch(cpu_shims._CpuTorch):
    """The shims' CPU view of torch, except that torch.cuda.current_device() is the meta device."""

    def __init__(self):
        super().__init__()
        self.cuda.current_device = lambda: torch.device("meta")


@pytest.fixture
def mcore_device_is_meta(monkeypatch):
    view = _MetaDeviceTorch()
    for module, _why in cpu_shims._CUDA_TORCH_MODULES:
        monkeypatch.setattr(importlib.import_module(module), "torch", view)


# tiny configs with room for one compressed expert (Phi-MoE's sparsemixer is top-2: 1 main + 1 CE)
CE_TINY = {"olmoe": dict(num_experts=4, num_experts_per_tok=3), "phimoe": {}}


def _build(family, params_dtype, variant, **overrides):
    fam = FAMILIES[family]
    cfg = fam.tiny_config(**CE_TINY[family])
    return fam.build(cfg.to_dict(), moe_ce_num_compressed=1, moe_ce_variant=variant,
                     params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, **overrides)


def _owner(model, name):
    return model.get_submodule(name.rsplit(".", 1)[0])


def _mcore_cpu_param(model, name) -> bool:
    """Parameters megatron-core 0.16.1 itself creates on the CPU whatever the flag: the local spec's
    norms (WrappedTorchNorm returns a plain torch.nn norm, default dtype) and the router weight
    (TopKRouter: created on CPU, moved to the GPU at its first forward)."""
    from megatron.core.transformer.moe.router import TopKRouter

    owner = _owner(model, name)
    return type(owner) in (torch.nn.LayerNorm, torch.nn.RMSNorm) or isinstance(owner, TopKRouter)


def _check(model, device, params_dtype):
    params = dict(model.named_parameters())
    # The reference: megatron-core's own tensor-parallel layers in the same model.
    assert params["embedding.word_embeddings.weight"].device == device
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"].device == device
    assert params["embedding.word_embeddings.weight"].dtype == params_dtype
    bad = []
    for name, p in params.items():
        if _mcore_cpu_param(model, name):
            continue
        if p.device != device or p.dtype != params_dtype:
            bad.append(f"{name}: {p.device} {p.dtype}")
    assert not bad, f"not on {device} / {params_dtype} like megatron-core's layers: {bad}"
    ce_tables = [n for n in params if ".mlp.ce." in n]
    assert ce_tables and all(getattr(params[n], "is_ce_table", False) for n in ce_tables)
    others = [n for n in params if getattr(params[n], "is_ce_table", False) and ".mlp.ce." not in n]
    assert not others, f"is_ce_table on non-CE parameters: {others}"


@pytest.mark.parametrize("family,variant", [("olmoe", "ia3"), ("phimoe", "ia3"), ("olmoe", "hidden")])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
def test_params_on_mcore_device(world1, mcore_device_is_meta, family, variant, params_dtype):
    model = _build(family, params_dtype, variant, use_cpu_initialization=False)
    _check(model, torch.device("meta"), params_dtype)


def test_cpu_initialization_flag_respected(world1, mcore_device_is_meta, family):
    """use_cpu_initialization=True: CPU for everything, although mcore's current device is meta."""
    model = _build(family.model_type, torch.bfloat16, "ia3", use_cpu_initialization=True)
    _check(model, torch.device("cpu"), torch.bfloat16)


def test_theta_and_qk_norm_init_to_one_and_reset(world1):
    model = _build("olmoe", torch.float32, "ia3", use_cpu_initialization=True)
    layer = model.decoder.layers[1]
    tables = [layer.mlp.ce.gate, layer.mlp.ce.up, layer.mlp.ce.down]
    norms = [layer.self_attention.q_layernorm.weight, layer.self_attention.k_layernorm.weight]
    assert all(torch.equal(t, torch.ones_like(t)) for t in tables + norms)
    assert all(t.sequence_parallel for t in tables)
    with torch.no_grad():
        for t in tables:
            t.normal_()
    layer.mlp.ce.reset_parameters()
    assert all(torch.equal(t, torch.ones_like(t)) for t in tables)
