"""megatron_ce.compat against the installed megatron-core (0.16.1 or 0.19.x): every megatron-core name
we rely on exists, every one we import is listed, unsupported releases fail at import in one line,
and CE is never silently off (specs of either kind become CE specs; a model whose MoE layers are
not CE layers is refused)."""

import ast
import functools
import importlib
import pathlib

import pytest
import torch

from megatron_ce import compat
from megatron_ce.runtime.cpu_shims import PATCHED_NAMES

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_ce"


def _resolve(module, attr):
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise
    parts = attr.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part) and i == 0:  # a submodule not imported by its package yet
            obj = importlib.import_module(f"{module}.{part}")
            continue
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("module,attr", compat.MCORE_NAMES, ids=[f"{m}:{a}" for m, a in compat.MCORE_NAMES])
def test_listed_name_exists_in_installed_mcore(module, attr):
    _resolve(module, attr)  # ImportError / AttributeError when this release renamed or removed it


def test_every_mcore_import_in_the_package_is_listed():
    listed = set(compat.MCORE_NAMES_BY_RELEASE) | set(PATCHED_NAMES)
    missing = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron.core"):
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if (node.module, a.name) not in listed]
    assert not missing, "megatron-core names not listed in compat.MCORE_NAMES_BY_RELEASE: " + ", ".join(missing)


def test_version_specific_names_listed_exactly_where_they_exist():
    old = {k for k, rel in compat.MCORE_NAMES_BY_RELEASE.items() if rel == "<0.17"}
    new = {k for k, rel in compat.MCORE_NAMES_BY_RELEASE.items() if rel == ">=0.17"}
    assert set(compat.MCORE_NAMES_BY_RELEASE.values()) == {"all", "<0.17", ">=0.17"}
    assert old and new
    expected = old if compat.HAS_LEGACY_GROUPED_MLP else new
    assert (old | new) & set(compat.MCORE_NAMES) == expected
    if not compat.HAS_LEGACY_GROUPED_MLP:  # gone for real, not merely unlisted
        with pytest.raises(ImportError):
            importlib.import_module("megatron.core.transformer.moe.grouped_gemm_util")


@pytest.mark.parametrize("version", [(0, 16, 1), (0, 19, 2), (0, 19, 7)])
def test_supported_versions_pass(version):
    compat.check_supported(version, ".".join(map(str, version)))


@pytest.mark.parametrize("version", [(0, 16, 0), (0, 17, 0), (0, 18, 3), (0, 19, 1), (0, 20, 0), (1, 0, 0)])
def test_unsupported_version_fails_in_one_line_naming_the_range(version):
    found = ".".join(map(str, version))
    with pytest.raises(ImportError) as e:
        compat.check_supported(version, found)
    msg = str(e.value)
    assert "\n" not in msg and found in msg and "0.16.1" in msg and ">=0.19.2,<0.20" in msg


def test_legacy_grouped_gemm_kwargs():
    if compat.HAS_LEGACY_GROUPED_MLP:
        assert compat.legacy_grouped_gemm_kwargs(True) == {"moe_use_legacy_grouped_gemm": True}
    else:
        assert compat.legacy_grouped_gemm_kwargs(False) == {}
        with pytest.raises(ValueError, match="moe_use_legacy_grouped_gemm"):
            compat.legacy_grouped_gemm_kwargs(True)  # refused, not silently SequentialMLP


def test_replace_spec_keeps_the_kind():
    from megatron.core.transformer.spec_utils import ModuleSpec

    class A(torch.nn.Module):
        def __init__(self, config=None, submodules=None, extra=None):
            super().__init__()
            self.got = (config, submodules, extra)

    class B(A):
        pass

    for spec in (ModuleSpec(module=A, submodules="s", params={"extra": 1}), functools.partial(A, submodules="s", extra=1)):
        new = compat.replace_spec(spec, module=B, submodules="t")
        assert type(new) is type(spec) and compat.spec_class(new) is B and compat.spec_submodules(new) == "t"
        assert compat.spec_class(spec) is A and compat.spec_submodules(spec) == "s"  # the original is untouched
        built = compat.build_spec(new, config="c")
        assert type(built) is B and built.got == ("c", "t", 1)


# ---------------------------------------------------------------------- CE is never silently off


@pytest.fixture(scope="module")
def world1():
    from megatron.core import parallel_state

    from megatron_ce.runtime import init_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(seed=1234)
    yield


def _ce_config(k_a=1):
    import torch.nn.functional as F

    from megatron_ce.ce import CETransformerConfig

    return CETransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=24, ffn_hidden_size=24, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bias_activation_fusion=False, use_cpu_initialization=True,
        moe_token_dispatcher_type="allgather", moe_ce_num_compressed=k_a,
    )


def test_ce_spec_of_mcore_local_spec_builds_ce_layer(world1):
    """mcore's own MoE spec (a ModuleSpec up to 0.17, a functools.partial since 0.18) becomes CE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ce.ce import CEMoELayer, CERouterMixin, to_ce_layer_spec
    from megatron_ce.ce.experts import CEExpertsMixin

    spec = to_ce_layer_spec(get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False))
    layer = compat.build_spec(spec.submodules.mlp, config=_ce_config())
    assert isinstance(layer, CEMoELayer) and layer.ce is not None
    assert isinstance(layer.router, CERouterMixin) and isinstance(layer.experts, CEExpertsMixin)


def test_plain_moe_layer_with_ce_config_is_refused(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ce.ce.config import ConfigError
    from megatron_ce.models.common import check_ce_layers

    config = _ce_config()
    plain = compat.build_spec(get_gpt_layer_local_spec(num_experts=4).submodules.mlp, config=config)
    model = torch.nn.ModuleDict({"mlp": plain})
    with pytest.raises(ConfigError, match="moe-ce-num-compressed=1 but MoE layer mlp is a plain MoELayer"):
        check_ce_layers(model, config)
    check_ce_layers(model, _ce_config(k_a=0))  # no CE asked for: a plain layer is right


@pytest.mark.parametrize("family", ["olmoe", "phimoe"])
def test_ce_models_have_only_ce_moe_layers(world1, family):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_ce.ce import CEMoELayer

    if family == "olmoe":
        from megatron_ce.models.olmoe import build_olmoe_model as build
        from tests.models.families import tiny_olmoe_config as tiny
    else:
        from megatron_ce.models.phimoe import SparseMixerRouter
        from megatron_ce.models.phimoe import build_phimoe_model as build
        from tests.models.families import tiny_phimoe_config as tiny
    model = build(tiny().to_dict(), moe_ce_num_compressed=1)
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe) == 2 and all(isinstance(m, CEMoELayer) and m.ce is not None for m in moe)
    if family == "phimoe":  # its own router survives the spec edits
        assert all(type(m.router) is SparseMixerRouter for m in moe)


def test_dist_ckpt_extra_files_are_what_this_release_writes(world1, tmp_path):
    """The files compat says a complete checkpoint has are exactly the non-tensor files
    dist_checkpointing.save writes here (0.19 dropped common.pt)."""
    import os

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    t = torch.arange(4.0)
    sd = {"w": ShardedTensor.from_rank_offsets("w", t, replica_id=parallel_state.get_data_parallel_rank())}
    dist_checkpointing.save(sd, str(tmp_path))
    written = {f for f in os.listdir(tmp_path) if not (f.endswith(".distcp") or f == ".metadata")}
    assert written == set(compat.DIST_CKPT_EXTRA_FILES)
