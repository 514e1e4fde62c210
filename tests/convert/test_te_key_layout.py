"""One checkpoint, both --transformer-impl: the local spec (converter, CPU) and the Transformer-Engine
spec (the launch scripts' default) write and read the same dist-checkpoint keys and global shapes, for
OLMoE and Phi-MoE, with and without CE, whatever the expert class (SequentialMLP, GroupedMLP,
TEGroupedMLP). TE is not installed here: the TE-spec models are built by megatron-core's own TE spec
functions on stand-ins of the TE modules whose checkpoint methods are megatron-core's own
(tests/convert/te_standins.py).

The reference layout in the key tests is the TE spec's (what mcore's TE modules save); end to end, an
HF checkpoint converted here is loaded into a TE-layout model and compared with the HF tensors, then
saved by that model and exported back, bit-exact.
"""

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from megatron_ce import compat
from megatron_ce.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_ce.convert.dist_io import DistCheckpointReader, model_layout
from megatron_ce.convert.engine import META_NAME, build_layout_model, world1_parallel_state
from megatron_ce.models.registry import get_family
from megatron_ce.convert.keys import legacy_key, read_legacy_keys
from tests.convert.te_standins import use_te_standins
from tests.models import families

CONFIGS = {"olmoe": families.tiny_olmoe_config, "phimoe": families.tiny_phimoe_config}
MAKE_HF = {"olmoe": families.make_hf_model, "phimoe": families.make_hf_model}
WORLD1 = dict(
    perform_initialization=False,
    use_cpu_initialization=True,
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=1,
    sequence_parallel=False,
)
# expert implementation -> (use_te, config fields)
EXPERTS = {
    "te_sequential": (True, dict(moe_grouped_gemm=False)),  # SequentialMLP of TE linears
    "te_grouped": (True, dict(moe_grouped_gemm=True)),  # TEGroupedMLP (weight0..weight{E-1})
}
if compat.HAS_LEGACY_GROUPED_MLP:  # the legacy GroupedMLP: megatron-core <0.17 only
    EXPERTS["local_grouped"] = (False, dict(moe_grouped_gemm=True, moe_use_legacy_grouped_gemm=True))


@pytest.fixture
def te(monkeypatch):
    use_te_standins(monkeypatch)


def _hf_config(family):
    return CONFIGS[family]().to_dict()


def _build(family, hf_cfg, k_a, experts, device="meta"):
    use_te, fields = EXPERTS[experts]
    with torch.device(device):
        return get_family(family).build_model(
            hf_cfg, moe_ce_num_compressed=k_a, moe_ce_variant="ia3", use_te=use_te, **WORLD1, **fields
        )


def _key_diff(reference, other) -> str:
    lines = [f"  only in the TE layout: {k} {reference[k]}" for k in sorted(set(reference) - set(other))]
    lines += [f"  only in the local layout: {k} {other[k]}" for k in sorted(set(other) - set(reference))]
    lines += [f"  shape {k}: TE {reference[k]} local {other[k]}" for k in sorted(set(reference) & set(other))
              if tuple(reference[k]) != tuple(other[k])]
    return "\n".join(lines)


@pytest.mark.parametrize("k_a", [0, 1])
@pytest.mark.parametrize("family", ["olmoe", "phimoe"])
def test_converter_layout_is_the_te_layout(te, family, k_a):
    """What the converter writes (local spec, SequentialMLP) is exactly what every TE-spec expert class
    and the local GroupedMLP read: same tensor keys, same global shapes."""
    hf_cfg = _hf_config(family)
    with world1_parallel_state():
        written = model_layout(build_layout_model(get_family(family), hf_cfg, k_a, "ia3")).keys()
        read = {e: model_layout(_build(family, hf_cfg, k_a, e)).keys() for e in EXPERTS}
    for experts, keys in read.items():
        assert keys == written, f"{family} k_a={k_a} {experts}:\n" + _key_diff(keys, written)
    # the pieces the issue is about, by name (TE: the input norm fused into linear_qkv, a separate
    # pre-MLP norm for MoE)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in written
    assert "decoder.layers.pre_mlp_layernorm.weight" in written
    assert ("decoder.layers.pre_mlp_layernorm.bias" in written) == (family == "phimoe")
    assert not any("linear_fc1.layer_norm" in k for k in written)


@pytest.mark.parametrize("num_experts", [None, 4])
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_flag_built_specs_share_keys(te, normalization, num_experts):
    """Models built from shape flags (no HF config): get_gpt_ce_layer_local_spec and
    get_gpt_ce_layer_te_spec, MoE and dense (a dense MLP keeps its norm fused into linear_fc1)."""
    from megatron_ce.ce import CETransformerConfig
    from megatron_ce.ce.spec import get_gpt_ce_layer_local_spec, get_gpt_ce_layer_te_spec
    from megatron_ce.models.common import build_gpt_model

    moe = {} if num_experts is None else dict(num_moe_experts=num_experts, moe_router_topk=2, moe_ffn_hidden_size=24)
    with world1_parallel_state(), torch.device("meta"):
        config = CETransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=24,
                                     normalization=normalization, gated_linear_unit=True, activation_func=F.silu,
                                     add_bias_linear=True, qk_layernorm=True,  # as the specs (0.19 checks)
                                     moe_ce_num_compressed=1 if num_experts else 0, **moe, **WORLD1)
        kw = dict(num_experts=num_experts, qk_layernorm=True)
        specs = {"local": get_gpt_ce_layer_local_spec(normalization=normalization, **kw),
                 "te": get_gpt_ce_layer_te_spec(**kw)}
        model_kw = dict(vocab_size=64, max_sequence_length=32, position_embedding_type="rope")
        keys = {n: model_layout(build_gpt_model(config, s, model_kw)).keys() for n, s in specs.items()}
    assert keys["te"] == keys["local"], _key_diff(keys["te"], keys["local"])
    fused = "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys["te"]
    assert fused == (num_experts is None)


# ---------------------------------------------------------------------------- end to end


def _layer_hf(hf, family, layer):
    """HF tensors of one layer: (input norm, post-attention norm, [(gate, up, down) per expert])."""
    p = f"model.layers.{layer}."
    if family == "olmoe":
        e = p + "mlp.experts.{}."
        names = ("gate_proj", "up_proj", "down_proj")
        n = sum(1 for k in hf if k.startswith(p + "mlp.experts.") and k.endswith("gate_proj.weight"))
    else:
        e = p + "block_sparse_moe.experts.{}."
        names = ("w1", "w3", "w2")
        n = sum(1 for k in hf if k.startswith(p + "block_sparse_moe.experts.") and k.endswith("w1.weight"))
    experts = [tuple(hf[e.format(i) + m + ".weight"] for m in names) for i in range(n)]
    return p + "input_layernorm.", p + "post_attention_layernorm.", experts


def _check_te_params(model, hf, family, grouped, te=True):
    """The model holds the HF weights where TE (te=False: the local spec) keeps them (independent of
    the converter: HF names and the fused [gate; up] fc1 layout)."""
    params = dict(model.named_parameters())
    input_norm = "self_attention.linear_qkv.layer_norm_" if te else "input_layernorm."
    for layer in range(model.config.num_layers):
        ln_in, ln_post, experts = _layer_hf(hf, family, layer)
        assert len(experts) == model.config.num_moe_experts
        L = f"decoder.layers.{layer}."
        suffixes = ("weight", "bias") if family == "phimoe" else ("weight",)
        for s in suffixes:
            assert torch.equal(params[L + input_norm + s], hf[ln_in + s])
            assert torch.equal(params[L + f"pre_mlp_layernorm.{s}"], hf[ln_post + s])
        for i, (gate, up, down) in enumerate(experts):
            if grouped:
                fc1 = params[L + f"mlp.experts.linear_fc1.weight{i}"]
                fc2 = params[L + f"mlp.experts.linear_fc2.weight{i}"]
            else:
                ex = L + f"mlp.experts.local_experts.{i}."
                fc1, fc2 = params[ex + "linear_fc1.weight"], params[ex + "linear_fc2.weight"]
            assert torch.equal(fc1, torch.cat([gate, up])) and torch.equal(fc2, down)


def _load_tensors(model, ckpt_dir):
    """Load a model's tensors as the trainer does (megatron_ce.training.checkpoint.load_model_weights:
    tensors only, TE `_extra_state` objects keep their init). Every tensor key must be there."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sharded = model.sharded_state_dict()
    present = set(dist_checkpointing.load_tensors_metadata(ckpt_dir))
    for k in [k for k, v in sharded.items() if isinstance(v, ShardedObject)]:
        sharded.pop(k)
    lacking = sorted({v.key for v in sharded.values()} - present)
    assert not lacking, f"{ckpt_dir} lacks {lacking}"
    state = dist_checkpointing.load(sharded, ckpt_dir)
    result = model.load_state_dict(state, strict=False)
    assert not [k for k in result.missing_keys if not k.endswith("_extra_state")], result.missing_keys


@pytest.mark.parametrize(
    "family,k_a,experts", [("olmoe", 1, "te_grouped"), ("phimoe", 0, "te_sequential"), ("phimoe", 1, "te_grouped")]
)
def test_hf_to_te_model_and_back(te, tmp_path, caplog, family, k_a, experts):
    """HF -> convert -> load into the TE-layout model (weights where TE keeps them) -> that model
    saves (what TE training writes) -> a local-spec model loads it, and the export to HF gives the
    original tensors, bit-exact."""
    from megatron.core import dist_checkpointing

    hf_cfg = CONFIGS[family]()
    MAKE_HF[family](hf_cfg).save_pretrained(tmp_path / "hf")
    hf = families.load_safetensors_dir(tmp_path / "hf")
    with caplog.at_level(logging.WARNING):
        ckpt = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mc", moe_ce_num_compressed=k_a, progress=False)
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]
    meta = json.loads((tmp_path / "mc" / META_NAME).read_text())

    with world1_parallel_state():
        model = _build(family, meta["hf_config"], k_a, experts, device="cpu")
        _load_tensors(model, ckpt)
        _check_te_params(model, hf, family, grouped=experts == "te_grouped")
        te_ckpt = tmp_path / "te" / "release"
        te_ckpt.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(te_ckpt))
        # what TE training wrote, read by a local-spec model (--transformer-impl local)
        local = get_family(family).build_model(meta["hf_config"], moe_ce_num_compressed=k_a, use_te=False, **WORLD1)
        _load_tensors(local, str(te_ckpt))
        _check_te_params(local, hf, family, grouped=False, te=False)
    shutil.copy(tmp_path / "mc" / META_NAME, te_ckpt / META_NAME)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        convert_megatron_to_hf(te_ckpt, tmp_path / "back", progress=False)
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]
    back = families.load_safetensors_dir(tmp_path / "back")
    bad = [k for k in hf if k not in back or not torch.equal(hf[k], back[k])]
    assert not bad, bad
    extra = set(back) - set(hf)  # the CE tables (created as ones)
    assert all(".ce_" in k or ".ce." in k for k in extra) and (bool(extra) == (k_a > 0)), sorted(extra)


# ---------------------------------------------------------------------------- older checkpoints


def test_legacy_key_names():
    assert legacy_key("decoder.layers.pre_mlp_layernorm.weight") == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    assert legacy_key("decoder.layers.pre_mlp_layernorm.bias") == "decoder.layers.mlp.linear_fc1.layer_norm_bias"
    assert legacy_key("decoder.layers.self_attention.linear_qkv.layer_norm_weight") is None
    assert legacy_key("decoder.final_layernorm.weight") is None


@pytest.mark.parametrize("family", ["olmoe", "phimoe"])
def test_checkpoint_with_pre_fix_keys_loads_and_exports(te, tmp_path, monkeypatch, family):
    """A checkpoint converted before this fix (pre-MLP norm under mcore's local-spec key
    `mlp.linear_fc1.layer_norm_*`) still exports bit-exact and loads into a TE-layout model through
    read_legacy_keys (the trainer's hook)."""
    import megatron_ce.ce.spec as spec_mod

    hf_cfg = CONFIGS[family]()
    MAKE_HF[family](hf_cfg).save_pretrained(tmp_path / "hf")
    hf = families.load_safetensors_dir(tmp_path / "hf")
    with monkeypatch.context() as m:  # the converter as it was: mcore's local keys map unchanged
        m.setattr(spec_mod, "with_te_checkpoint_keys", lambda spec: spec)
        ckpt = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "old", progress=False)
    old_keys = set(DistCheckpointReader(ckpt).tensors)
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in old_keys
    assert "decoder.layers.pre_mlp_layernorm.weight" not in old_keys

    convert_megatron_to_hf(tmp_path / "old", tmp_path / "back", progress=False)
    back = families.load_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(hf) and all(torch.equal(hf[k], back[k]) for k in hf)

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    meta = json.loads((tmp_path / "old" / META_NAME).read_text())
    with world1_parallel_state():
        model = _build(family, meta["hf_config"], 0, "te_grouped", device="cpu")
        sharded = {k: v for k, v in model.sharded_state_dict().items() if not isinstance(v, ShardedObject)}
        renames = read_legacy_keys(sharded, old_keys)
        assert set(renames) == {"decoder.layers.pre_mlp_layernorm." + s for s in (
            ("weight", "bias") if family == "phimoe" else ("weight",))}
        model.load_state_dict(dist_checkpointing.load(sharded, ckpt), strict=False)
        _check_te_params(model, hf, family, grouped=True)
        # a checkpoint holding today's keys (even beside an old one): nothing renamed
        fresh = model.sharded_state_dict()
        today = {v.key for v in fresh.values() if not isinstance(v, ShardedObject)}
        assert read_legacy_keys(fresh, today | set(renames.values())) == {}


@pytest.mark.parametrize("old_keys", [False, True])
def test_trainer_loader_reads_te_grouped_and_pre_fix_checkpoints(te, tmp_path, monkeypatch, old_keys):
    """The trainer's load_model_weights: a converted checkpoint (today's keys, or written before this
    fix) loads into a local model and into a TE-layout model with TEGroupedMLP, whose per-expert
    `_extra_state1..` objects are not tensors a checkpoint lacks."""
    import megatron_ce.ce.spec as spec_mod
    from megatron_ce.training import checkpoint

    family = "phimoe"
    MAKE_HF[family](CONFIGS[family]()).save_pretrained(tmp_path / "hf")
    hf = families.load_safetensors_dir(tmp_path / "hf")
    with monkeypatch.context() as m:
        if old_keys:  # the converter as it was
            m.setattr(spec_mod, "with_te_checkpoint_keys", lambda spec: spec)
        ckpt = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mc", progress=False)
    assert ("decoder.layers.mlp.linear_fc1.layer_norm_weight" in DistCheckpointReader(ckpt).tensors) == old_keys
    meta = json.loads((tmp_path / "mc" / META_NAME).read_text())
    with world1_parallel_state():
        for experts in ("te_grouped", "local"):
            if experts == "local":
                model = get_family(family).build_model(meta["hf_config"], use_te=False, **WORLD1)
            else:
                model = _build(family, meta["hf_config"], 0, experts, device="cpu")
            checkpoint.load_model_weights(model, ckpt)
            _check_te_params(model, hf, family, grouped=experts == "te_grouped", te=experts != "local")
