"""OLMoE on megatron-core: config mapping, QK-norm, logits parity with transformers (fp32), CE identity."""

import pytest
import torch

from megatron_ce import compat
from megatron_ce.ce.config import ConfigError
from megatron_ce.models.olmoe import (
    FullWidthRMSNorm,
    olmoe_layer_spec,
    olmoe_model_kwargs,
    olmoe_transformer_config,
)
from tests.models.families import (
    build_and_load,
    hf_logits,
    make_hf_model,
    mcore_logits,
    tiny_olmoe_config,
    token_ids,
)

TOL = 1e-4


# ---------------------------------------------------------------------------- config


def test_config_maps_hf_fields():
    cfg = tiny_olmoe_config(rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    tc = olmoe_transformer_config(cfg)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (2, 32, 4, 4)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 48)
    assert tc.moe_router_pre_softmax is True  # norm_topk_prob=False: softmax over all, no renorm
    assert tc.moe_router_score_function == "softmax"
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.add_bias_linear is False and tc.gated_linear_unit is True
    assert tc.qk_layernorm is False  # the spec supplies FullWidthRMSNorm
    assert tc.moe_router_load_balancing_type == "none" and tc.moe_aux_loss_coeff == 0.0
    assert tc.moe_ce_num_compressed == 0
    kw = olmoe_model_kwargs(cfg)
    assert kw["rotary_base"] == 5e5 and kw["share_embeddings_and_output_weights"] is False
    assert kw["position_embedding_type"] == "rope" and kw["vocab_size"] == 128


def test_config_options():
    tc = olmoe_transformer_config(tiny_olmoe_config(norm_topk_prob=True, output_router_logits=True))
    assert tc.moe_router_pre_softmax is False  # top-k logits then softmax = renormalised top-k
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff == 0.01
    tc = olmoe_transformer_config(tiny_olmoe_config(), moe_ce_num_compressed=1, moe_ce_variant="hidden")
    assert tc.moe_ce_num_compressed == 1 and tc.moe_ce_variant == "hidden" and tc.moe_ce_num_main == 1


def test_config_from_4x_dict():
    """A transformers 4.x config.json: rope_theta at top level, no rope_parameters."""
    d = tiny_olmoe_config().to_dict()
    d.pop("rope_parameters", None)
    d["rope_theta"] = 1234.0
    assert olmoe_model_kwargs(d)["rotary_base"] == 1234.0
    olmoe_transformer_config(d)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("attention_bias", True, "attention_bias"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("hidden_act", "gelu", "hidden_act"),
        ("model_type", "mixtral", "model_type"),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type"),
    ],
)
def test_config_errors(field, value, match):
    d = tiny_olmoe_config().to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=match):
        olmoe_transformer_config(d)


@pytest.mark.parametrize(
    "kw,flag",
    [
        (dict(tensor_model_parallel_size=3, sequence_parallel=True), "--tensor-model-parallel-size"),
        (dict(pipeline_model_parallel_size=3, pipeline_dtype=torch.float32), "--pipeline-model-parallel-size"),
        (dict(expert_model_parallel_size=3), "--expert-model-parallel-size"),
    ],
)
def test_layout_not_dividing_model_names_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        olmoe_transformer_config(tiny_olmoe_config(), **kw)


def test_vocab_not_dividing_tp_names_flag():
    from megatron_ce.models.common import check_divisible

    with pytest.raises(ConfigError, match="--tensor-model-parallel-size"):
        check_divisible(127, 2, "--vocab-size", "--tensor-model-parallel-size")


def test_layer_spec_uses_full_width_qk_norm_and_ce():
    from megatron_ce.ce import CEMoELayer

    tc = olmoe_transformer_config(tiny_olmoe_config())
    spec = olmoe_layer_spec(tc)
    attn = spec.submodules.self_attention.submodules
    assert attn.q_layernorm.module is FullWidthRMSNorm and attn.q_layernorm.params["num_heads"] == 4
    assert attn.k_layernorm.module is FullWidthRMSNorm
    assert not issubclass(compat.spec_class(spec.submodules.mlp), CEMoELayer)
    ce_tc = olmoe_transformer_config(tiny_olmoe_config(), moe_ce_num_compressed=1)
    assert issubclass(compat.spec_class(olmoe_layer_spec(ce_tc).submodules.mlp), CEMoELayer)


# ---------------------------------------------------------------------------- QK-norm


def test_full_width_norm_matches_hf_and_differs_from_per_head(world1):
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    tc = olmoe_transformer_config(tiny_olmoe_config())
    norm = FullWidthRMSNorm(tc, hidden_size=8, eps=1e-5, num_heads=4)
    ref = OlmoeRMSNorm(32, eps=1e-5)
    g = torch.Generator().manual_seed(0)
    w = 1 + 0.3 * torch.randn(32, generator=g)
    with torch.no_grad():
        norm.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(5, 2, 4, 8, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0]).view(4, 1)
    got = norm(x)
    want = ref(x.reshape(5, 2, 32)).reshape(5, 2, 4, 8)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    per_head = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w.view(4, 8)
    assert (per_head - want).abs().max() > 1e-2  # mcore's qk_layernorm would be a different function


# ---------------------------------------------------------------------------- parity (TP=EP=PP=1)


def _convert(tmp_path, hf_model, name="hf", **kw):
    from megatron_ce.convert import convert_hf_to_megatron

    hf_dir = tmp_path / name
    hf_model.save_pretrained(hf_dir)
    return convert_hf_to_megatron(hf_dir, tmp_path / (name + "_mc"), progress=False, **kw)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": True},
        {"num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 3},
        {"clip_qkv": 0.5},
    ],
    ids=["olmoe", "norm_topk_prob", "gqa_6experts_top3", "clip_qkv"],
)
def test_logits_parity_world1(world1, tmp_path, overrides):
    cfg = tiny_olmoe_config(**overrides)
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf)
    model = build_and_load(cfg.to_dict(), ckpt)
    ids = token_ids()
    ref = hf_logits(hf, ids)
    got = mcore_logits(model, ids)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"max |mcore - hf| = {diff}"
    assert ref.abs().max() > 1.0  # the comparison is not trivially small


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_ce_theta_one_equals_stock_topk_main(world1, tmp_path, variant):
    """CE with k=4, k_a=2 and theta = 1 (as converted) equals the stock model with top-2."""
    cfg = tiny_olmoe_config(num_experts=6, num_experts_per_tok=4)
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf, moe_ce_num_compressed=2, moe_ce_variant=variant)
    ce_model = build_and_load(cfg.to_dict(), ckpt, ce=2, variant=variant)
    ids = token_ids()
    stock_topk_main = make_hf_model(tiny_olmoe_config(num_experts=6, num_experts_per_tok=2))
    stock_topk_main.load_state_dict(hf.state_dict())
    ref = hf_logits(stock_topk_main, ids)
    got = mcore_logits(ce_model, ids)
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"CE(theta=1) vs stock top-k_m: {diff}"
    full = hf_logits(hf, ids)
    assert (full - ref).abs().max() > 10 * TOL  # top-4 and top-2 do differ here
    for name, p in ce_model.named_parameters():
        if ".ce." in name:
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.skipif(not compat.HAS_LEGACY_GROUPED_MLP, reason="legacy GroupedMLP: megatron-core <0.17 only")
def test_grouped_mlp_checkpoint_round_trip(world1, tmp_path):
    """A checkpoint saved by a model with legacy GroupedMLP experts converts back bit-exact (its
    dist-checkpoint keys are SequentialMLP's), and a CE GroupedMLP model (fp32 grouped path) with
    theta = 1 matches the stock top-k_m model."""
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_ce.convert import META_NAME, convert_megatron_to_hf
    from tests.models.families import load_safetensors_dir

    cfg = tiny_olmoe_config(num_experts=6, num_experts_per_tok=4)
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf)
    grouped = dict(moe_grouped_gemm=True, moe_use_legacy_grouped_gemm=True)
    model = build_and_load(cfg.to_dict(), ckpt, **grouped)
    assert type(model.decoder.layers[0].mlp.experts).__name__ == "GroupedMLP"
    saved = tmp_path / "grouped_saved"
    saved.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(saved))
    shutil.copy(f"{ckpt}/{META_NAME}", saved)
    convert_megatron_to_hf(saved, tmp_path / "back", progress=False)
    a, b = load_safetensors_dir(tmp_path / "hf"), load_safetensors_dir(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    ce_ckpt = _convert(tmp_path, hf, name="hf_ce", moe_ce_num_compressed=2)
    ce_model = build_and_load(cfg.to_dict(), ce_ckpt, ce=2, **grouped)
    stock = make_hf_model(tiny_olmoe_config(num_experts=6, num_experts_per_tok=2))
    stock.load_state_dict(hf.state_dict())
    ids = token_ids()
    assert (mcore_logits(ce_model, ids) - hf_logits(stock, ids)).abs().max().item() <= TOL
