"""Phi-MoE on megatron-core: config mapping, sparsemixer router vs transformers (eval and training),
LongRoPE (short and long regimes), logits parity with transformers (fp32), conversion round trip,
CE with theta = 1 equals stock top-1-main."""

import json

import pytest
import torch

from megatron_ce import compat
from megatron_ce.ce.config import ConfigError
from megatron_ce.models.phimoe import (
    JitteredPreMoENorm,
    PhimoeSelfAttention,
    SparseMixerRouter,
    longrope_params,
    phimoe_layer_spec,
    phimoe_model_kwargs,
    phimoe_transformer_config,
    sparsemixer,
)
from tests.models.families import (
    LONG_SEQ,
    ORIGINAL_MAX,
    SHORT_SEQ,
    build_and_load,
    hf_logits,
    load_safetensors_dir,
    make_hf_model,
    mcore_logits,
    tiny_phimoe_config,
    token_ids,
)

TOL = 1e-4


def _hf_sparsemixer():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

    return hf_sparsemixer


# ---------------------------------------------------------------------------- config


def test_config_maps_hf_fields():
    cfg = tiny_phimoe_config(rms_norm_eps=1e-6, input_jitter_noise=0.01)
    tc = phimoe_transformer_config(cfg)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (
        2, 32, 4, 2, 8,
    )
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 48)
    assert tc.normalization == "LayerNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.add_bias_linear is False and tc.add_qkv_bias is True and tc.gated_linear_unit is True
    assert tc.qk_layernorm is False
    assert tc.sparsemixer_eps == 0.2 and tc.phimoe_input_jitter_noise == 0.01 and tc.phimoe_lm_head_bias
    assert tc.moe_router_load_balancing_type == "none" and tc.moe_aux_loss_coeff == 0.0
    kw = phimoe_model_kwargs(cfg)
    assert kw["rotary_base"] == 10000.0 and kw["share_embeddings_and_output_weights"] is False
    assert kw["longrope"]["original_max_position_embeddings"] == ORIGINAL_MAX
    assert kw["longrope"]["short_mscale"] == 1.05 and kw["longrope"]["long_mscale"] == 1.35
    tc = phimoe_transformer_config(cfg, moe_ce_num_compressed=1)
    assert tc.moe_ce_num_compressed == 1 and tc.moe_ce_num_main == 1


def test_config_from_4x_dict():
    """A transformers 4.x config.json (Phi-3.5-MoE style): rope_scaling with `type`, rope_theta and
    original_max_position_embeddings at top level."""
    d = tiny_phimoe_config().to_dict()
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["original_max_position_embeddings"] = rp.pop("original_max_position_embeddings")
    rp.pop("rope_type")
    d["rope_scaling"] = dict(rp, type="longrope")
    lr = longrope_params(d)
    assert lr["original_max_position_embeddings"] == ORIGINAL_MAX and lr["short_factor"] == rp["short_factor"]
    assert phimoe_model_kwargs(d)["rotary_base"] == 10000.0
    phimoe_transformer_config(d)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_experts_per_tok", 3, "top-2"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("hidden_act", "gelu", "hidden_act"),
        ("model_type", "mixtral", "model_type"),
        ("sliding_window", 8, "sliding_window"),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, "rope_type"),
    ],
)
def test_config_errors(field, value, match):
    d = tiny_phimoe_config().to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=match):
        phimoe_transformer_config(d)


def test_config_errors_longrope_and_capacity():
    d = tiny_phimoe_config().to_dict()
    d["rope_parameters"] = dict(d["rope_parameters"], short_factor=[1.0])
    with pytest.raises(ConfigError, match="short_factor"):
        phimoe_transformer_config(d)
    with pytest.raises(ConfigError, match="capacity"):
        phimoe_transformer_config(tiny_phimoe_config(), moe_expert_capacity_factor=1.0)


def test_layer_spec():
    from megatron.core.tensor_parallel import RowParallelLinear

    from megatron_ce.ce import CEMoELayer

    tc = phimoe_transformer_config(tiny_phimoe_config())
    spec = phimoe_layer_spec(tc)
    attn = spec.submodules.self_attention
    assert attn.module is PhimoeSelfAttention
    assert issubclass(attn.submodules.linear_proj, RowParallelLinear) and attn.submodules.linear_proj is not RowParallelLinear
    assert compat.spec_submodules(spec.submodules.mlp).router is SparseMixerRouter
    assert spec.submodules.pre_mlp_layernorm.module is JitteredPreMoENorm
    assert not issubclass(compat.spec_class(spec.submodules.mlp), CEMoELayer)
    ce_spec = phimoe_layer_spec(phimoe_transformer_config(tiny_phimoe_config(), moe_ce_num_compressed=1))
    assert issubclass(compat.spec_class(ce_spec.submodules.mlp), CEMoELayer)
    assert compat.spec_submodules(ce_spec.submodules.mlp).router is SparseMixerRouter  # kept: mixes in CERouterMixin
    no_bias = phimoe_layer_spec(phimoe_transformer_config(tiny_phimoe_config(attention_bias=False)))
    assert no_bias.submodules.self_attention.submodules.linear_proj is RowParallelLinear


# ---------------------------------------------------------------------------- sparsemixer


def _router_logits(seed=0, tokens=512, experts=8):
    g = torch.Generator().manual_seed(seed)
    # mix of spreads: some rows near-tied (many experts kept by the mask), some peaked
    scale = torch.exp(torch.randn(tokens, 1, generator=g))
    return torch.randn(tokens, experts, generator=g) * scale


@pytest.mark.parametrize("eps", [0.01, 0.2, 1.0])
def test_sparsemixer_eval_equals_transformers(eps):
    scores = _router_logits()
    w, s = sparsemixer(scores, eps, training=False)
    hw, hs = _hf_sparsemixer()(scores, jitter_eps=eps, training=False)
    assert torch.equal(s, hs) and torch.equal(w, hw)
    assert w.shape == (512, 2) and (s[:, 0] != s[:, 1]).all()
    if eps >= 0.2:
        # pick order is not weight order: a second weight above the first happens
        assert (w[:, 1] > w[:, 0]).any()


def test_sparsemixer_training_equals_transformers():
    """Same generator state -> same Gumbel picks, 1.0/0.3333 multipliers and custom-backward grads."""
    base = _router_logits(seed=1, tokens=256)
    grads, outs = [], []
    for fn in (lambda x: sparsemixer(x, 0.2, training=True), lambda x: _hf_sparsemixer()(x, jitter_eps=0.2, training=True)):
        x = base.clone().requires_grad_(True)
        torch.manual_seed(7)
        w, s = fn(x)
        (w * torch.arange(1.0, 3.0)).sum().backward()
        outs.append((w.detach(), s))
        grads.append(x.grad)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(grads[0], grads[1])
    # training picks are sampled: they differ from the argmax picks somewhere
    assert not torch.equal(outs[0][1], sparsemixer(base, 0.2, training=False)[1])


def test_router_module_matches_hf_router(world1):
    """SparseMixerRouter (eval) on hidden states: dense probs/routing map = HF PhimoeTopKRouter's
    (weights, experts) scattered; rank_selected returns the pick order; CE split = (first pick with
    its weight, second pick with aux weight 1)."""
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    hf_cfg = tiny_phimoe_config(num_local_experts=6)
    tc = phimoe_transformer_config(hf_cfg, moe_ce_num_compressed=1)
    router = SparseMixerRouter(tc, pg_collection=_pgs()).eval()
    ref = PhimoeTopKRouter(hf_cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=g))
        router.weight.copy_(ref.weight)
    x = torch.randn(10, 3, 32, generator=g)  # [s, b, h]
    with torch.no_grad():
        probs, rmap = router(x)
        _, hw, hs = ref(x.reshape(-1, 32))
    want = torch.zeros(30, 6).scatter(1, hs, hw)
    assert torch.equal(probs, want) and torch.equal(rmap, want > 0)
    assert torch.equal(router.rank_selected(probs, rmap), hs)
    main_probs, main_map, aux_idx, aux_w = router.split_main_aux(probs, rmap)
    assert torch.equal(main_map, torch.zeros(30, 6, dtype=torch.bool).scatter(1, hs[:, :1], True))
    assert torch.equal(main_probs, torch.zeros(30, 6).scatter(1, hs[:, :1], hw[:, :1]))
    assert torch.equal(aux_idx, hs[:, 1:]) and torch.equal(aux_w, torch.ones(30, 1))


def _pgs():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


# ---------------------------------------------------------------------------- LongRoPE


def test_transformers_longrope_uses_short_factor_and_switches_mscale():
    """What the pinned transformers (5.24) does, which we match: inv_freq from short_factor at every
    length; only the attention scaling (mscale) switches at original_max_position_embeddings."""
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding

    from megatron_ce.models.phimoe import longrope_inv_freq

    cfg = tiny_phimoe_config()
    lr = longrope_params(cfg.to_dict())
    rot = PhimoeRotaryEmbedding(cfg)
    x = torch.zeros(1)
    for seq, mscale in ((ORIGINAL_MAX, 1.05), (ORIGINAL_MAX + 1, 1.35)):
        pos = torch.arange(seq)[None]
        cos, sin = rot(x, pos)
        freqs = pos[0, :, None].float() * longrope_inv_freq(lr, 10000.0, 8)
        emb = torch.cat([freqs, freqs], -1)
        torch.testing.assert_close(cos[0], emb.cos() * mscale, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[0], emb.sin() * mscale, rtol=0, atol=1e-6)


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
        {"attention_bias": False, "lm_head_bias": False, "router_jitter_noise": 0.01},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}, "num_local_experts": 6},
        {"router_jitter_noise": 0.5},  # the mask keeps every non-negative logit: many candidates
    ],
    ids=["phimoe_longrope_biases", "no_biases_eps0.01", "default_rope_6experts", "eps0.5"],
)
def test_logits_parity_world1(world1, tmp_path, overrides):
    cfg = tiny_phimoe_config(**overrides)
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf)
    model = build_and_load(cfg.to_dict(), ckpt)
    for seq in (SHORT_SEQ, LONG_SEQ):  # <= and > original_max_position_embeddings
        ids = token_ids(seq=seq)
        ref = hf_logits(hf, ids)
        got = mcore_logits(model, ids)
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"seq {seq}: max |mcore - hf| = {diff}"
        assert ref.abs().max() > 1.0


def test_long_regime_matters(world1, tmp_path):
    """At a sequence longer than original_max_position_embeddings the long mscale is in effect: with
    the short one forced, the logits are off by far more than the tolerance."""
    cfg = tiny_phimoe_config()
    hf = make_hf_model(cfg)
    model = build_and_load(cfg.to_dict(), _convert(tmp_path, hf))
    ids = token_ids(seq=LONG_SEQ)
    ref = hf_logits(hf, ids)
    attn = [layer.self_attention for layer in model.decoder.layers]
    assert attn[0].rope_mscale(torch.zeros(LONG_SEQ, 1, 1, 8)) == 1.35
    assert attn[0].rope_mscale(torch.zeros(ORIGINAL_MAX, 1, 1, 8)) == 1.05
    saved = [a.longrope for a in attn]
    try:
        for a in attn:
            a.longrope = dict(a.longrope, long_mscale=a.longrope["short_mscale"])
        wrong = mcore_logits(model, ids)
    finally:
        for a, s in zip(attn, saved):
            a.longrope = s
    assert (wrong - ref).abs().max() > 100 * TOL
    assert (mcore_logits(model, ids) - ref).abs().max() <= TOL


# ---------------------------------------------------------------------------- conversion


def test_round_trip_bit_exact_and_stock_hf_loads(world1, tmp_path):
    """HF -> Megatron -> HF is bit-exact; HF -> Megatron -> (load, save from the model) -> HF too;
    the export loads with stock PhimoeForCausalLM and gives the same logits."""
    import shutil

    from megatron.core import dist_checkpointing
    from transformers import PhimoeForCausalLM

    from megatron_ce.convert import META_NAME, convert_megatron_to_hf

    cfg = tiny_phimoe_config()
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf)
    convert_megatron_to_hf(tmp_path / "hf_mc", tmp_path / "back", progress=False)
    a, b = load_safetensors_dir(tmp_path / "hf"), load_safetensors_dir(tmp_path / "back")
    assert "lm_head.bias" in a and "model.layers.1.self_attn.o_proj.bias" in a
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in a
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    model = build_and_load(cfg.to_dict(), ckpt)
    saved = tmp_path / "saved"
    saved.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(saved))
    shutil.copy(f"{ckpt}/{META_NAME}", saved)
    convert_megatron_to_hf(saved, tmp_path / "back2", progress=False)
    c = load_safetensors_dir(tmp_path / "back2")
    assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)

    exported = PhimoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    with open(tmp_path / "back" / "config.json") as f:
        assert json.load(f)["model_type"] == "phimoe"
    ids = token_ids(seq=LONG_SEQ)
    assert torch.equal(hf_logits(exported, ids), hf_logits(hf, ids))


def test_reads_transformers5_fused_layout(world1, tmp_path):
    """A checkpoint written with the transformers 5.x in-memory names (mlp.router, fused
    experts.gate_up_proj / down_proj) converts to the same Megatron tensors, and back to 4.x names."""
    from safetensors.torch import save_file

    from megatron_ce.convert import convert_hf_to_megatron, convert_megatron_to_hf

    cfg = tiny_phimoe_config()
    hf = make_hf_model(cfg)
    _convert(tmp_path, hf)
    fused_dir = tmp_path / "hf5"
    fused_dir.mkdir()
    state = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state and "model.layers.0.mlp.router.weight" in state
    save_file(state, str(fused_dir / "model.safetensors"))
    with open(tmp_path / "hf" / "config.json") as f:
        cfg_json = f.read()
    (fused_dir / "config.json").write_text(cfg_json)
    convert_hf_to_megatron(fused_dir, tmp_path / "hf5_mc", progress=False)
    convert_megatron_to_hf(tmp_path / "hf5_mc", tmp_path / "hf5_back", progress=False)
    a, b = load_safetensors_dir(tmp_path / "hf"), load_safetensors_dir(tmp_path / "hf5_back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_misshaped_keys_one_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_ce.convert import ConversionError, convert_hf_to_megatron

    hf = make_hf_model(tiny_phimoe_config())
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    t = load_file(str(d / "model.safetensors"))
    del t["lm_head.bias"]
    t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(3)
    t["model.layers.0.block_sparse_moe.extra"] = torch.zeros(1)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        convert_hf_to_megatron(d, tmp_path / "mc", progress=False)
    msg = str(e.value)
    assert "lm_head.bias" in msg and "o_proj.bias" in msg and "block_sparse_moe.extra" in msg


# ---------------------------------------------------------------------------- CE


def test_ce_theta_one_equals_stock_top1_main(world1, tmp_path, monkeypatch):
    """CE (top-2 -> 1 main + 1 compressed) with theta = 1 (as converted) equals the stock model that
    keeps only the first sparsemixer pick with its weight (HF with sparsemixer truncated to pick 1)."""
    import transformers.models.phimoe.modeling_phimoe as hf_mod

    cfg = tiny_phimoe_config()
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf, moe_ce_num_compressed=1)
    ce_model = build_and_load(cfg.to_dict(), ckpt, ce=1)
    for name, p in ce_model.named_parameters():
        if ".ce." in name:
            assert torch.equal(p, torch.ones_like(p)), name
    for seq in (SHORT_SEQ, LONG_SEQ):
        ids = token_ids(seq=seq)
        full = hf_logits(hf, ids)
        orig = hf_mod.sparsemixer
        monkeypatch.setattr(hf_mod, "sparsemixer", lambda *a, **k: tuple(t[:, :1] for t in orig(*a, **k)))
        ref = hf_logits(hf, ids)
        monkeypatch.setattr(hf_mod, "sparsemixer", orig)
        got = mcore_logits(ce_model, ids)
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"seq {seq}: CE(theta=1) vs stock top-1-main: {diff}"
        assert (full - ref).abs().max() > 10 * TOL  # dropping the second pick does change the model


def test_train_step_runs_with_jitter_and_ce(world1, tmp_path):
    """Training mode (Gumbel sampling, custom backward, input jitter, CE): forward + backward run,
    gradients reach the router and the CE tables; eval mode is deterministic."""
    cfg = tiny_phimoe_config(input_jitter_noise=0.05)
    hf = make_hf_model(cfg)
    ckpt = _convert(tmp_path, hf, moe_ce_num_compressed=1)
    model = build_and_load(cfg.to_dict(), ckpt, ce=1)
    ids = token_ids(seq=LONG_SEQ)
    pos = torch.arange(LONG_SEQ)[None].expand_as(ids)
    model.train()
    torch.manual_seed(0)
    a = model(ids, pos, None)
    a.float().pow(2).mean().backward()
    torch.manual_seed(1)
    with torch.no_grad():
        b = model(ids, pos, None)
    assert not torch.equal(a.detach(), b)  # sampled routing / jitter differ between seeds
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["decoder.layers.0.mlp.router.weight"].abs().sum() > 0
    assert grads["decoder.layers.0.mlp.ce.gate"].abs().sum() > 0
    assert grads["output_layer.bias"].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, pos, None), model(ids, pos, None))


# ---------------------------------------------------------------------------- gloo, 2 ranks


def _parallel_case(tmp_path, monkeypatch, names, round_trip):
    """One spawn of 2 ranks running the layouts `names`: logits equal transformers' in both LongRoPE
    regimes (CE runs: HF top-1-main); the layouts in `round_trip`, saved again, convert back to HF
    bit-exact."""
    import os
    import shutil

    import transformers.models.phimoe.modeling_phimoe as hf_mod

    from megatron_ce.convert import META_NAME, convert_hf_to_megatron, convert_megatron_to_hf
    from tests.dist_harness import run_distributed
    from tests.models.families import layouts_rank_fn

    cfg = tiny_phimoe_config()
    hf = make_hf_model(cfg)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, max_shard_size="40KB")
    ckpt = convert_hf_to_megatron(hf_dir, tmp_path / "mc", progress=False)
    ce_ckpt = convert_hf_to_megatron(hf_dir, tmp_path / "mc_ce", moe_ce_num_compressed=1, progress=False)
    ids_list = [token_ids(seq=SHORT_SEQ), token_ids(seq=LONG_SEQ)]
    ref = [hf_logits(hf, ids) for ids in ids_list]
    orig = hf_mod.sparsemixer
    monkeypatch.setattr(hf_mod, "sparsemixer", lambda *a, **k: tuple(t[:, :1] for t in orig(*a, **k)))
    ref_top1 = [hf_logits(hf, ids) for ids in ids_list]
    monkeypatch.setattr(hf_mod, "sparsemixer", orig)

    all_runs = dict(
        tp2_sp=dict(ckpt=ckpt, tp=2),
        ep2=dict(ckpt=ckpt, ep=2),
        pp2=dict(ckpt=ckpt, pp=2),
        ep2_alltoall=dict(ckpt=ckpt, ep=2, dispatcher="alltoall"),
        ce_tp2_sp=dict(ckpt=ce_ckpt, tp=2, ce=1),
        ce_ep2_alltoall=dict(ckpt=ce_ckpt, ep=2, ce=1, dispatcher="alltoall"),
    )
    runs = [dict(all_runs[n], name=n) for n in names]
    saved = tmp_path / "saved"
    got = run_distributed(layouts_rank_fn, 2, runs, cfg.to_dict(), ids_list, str(saved), timeout=300)
    for run in runs:
        want = ref_top1 if run.get("ce") else ref
        for i, (g, r) in enumerate(zip(got[run["name"]], want)):
            diff = (g - r).abs().max().item()
            assert diff <= TOL, f"{run['name']} seq {ids_list[i].shape[1]}: max |mcore - hf| = {diff}"
    a = load_safetensors_dir(hf_dir)
    for name in round_trip:
        path = saved / name
        shutil.copy(os.path.join(ckpt, META_NAME), path)
        out = tmp_path / ("back_" + name)
        convert_megatron_to_hf(path, out, progress=False)
        b = load_safetensors_dir(out)
        assert set(a) == set(b)
        bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not bad, f"not bit-exact after a round trip through {name}: {bad}"


def test_parity_and_round_trip_tp2_ep2_pp2(tmp_path, monkeypatch):
    """TP2+SP, EP2, PP2: parity with transformers and HF -> Megatron -> (layout) -> HF bit-exact."""
    _parallel_case(tmp_path, monkeypatch, ["tp2_sp", "ep2", "pp2"], round_trip=["tp2_sp", "ep2", "pp2"])


def test_parity_alltoall_and_ce_tp2_ep2(tmp_path, monkeypatch):
    """alltoall dispatcher at EP2; CE (theta = 1) at TP2+SP and EP2-alltoall equals HF top-1-main."""
    _parallel_case(tmp_path, monkeypatch, ["ep2_alltoall", "ce_tp2_sp", "ce_ep2_alltoall"], round_trip=[])


def test_ce_tables_export_and_reimport(world1, tmp_path):
    """A CE checkpoint exports its tables under block_sparse_moe.ce.* and converts back from them."""
    import warnings

    from megatron_ce.convert import convert_hf_to_megatron, convert_megatron_to_hf

    hf = make_hf_model(tiny_phimoe_config())
    _convert(tmp_path, hf, moe_ce_num_compressed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_megatron_to_hf(tmp_path / "hf_mc", tmp_path / "ce_hf", progress=False)
    t = load_safetensors_dir(tmp_path / "ce_hf")
    assert t["model.layers.1.block_sparse_moe.ce.down"].shape == (4, 48)
    assert torch.equal(t["model.layers.0.block_sparse_moe.ce.gate"], torch.ones(4, 32))
    with open(tmp_path / "ce_hf" / "config.json") as f:
        assert json.load(f)["moe_ce_num_compressed"] == 1
    convert_hf_to_megatron(tmp_path / "ce_hf", tmp_path / "ce_mc", progress=False)
    with open(tmp_path / "ce_mc" / "megatron_ce.json") as f:
        meta = json.load(f)
    assert meta["ce_source"] == "checkpoint" and meta["moe_ce_num_compressed"] == 1


def test_load_balancing_loss_when_output_router_logits(world1, tmp_path):
    """output_router_logits=true turns on megatron-core's switch aux loss (on softmax top-2 scores,
    as HF); a training step runs and the router weight gets gradients from the sparsemixer's custom
    backward and the aux loss."""
    cfg = tiny_phimoe_config(output_router_logits=True, router_aux_loss_coef=0.1)
    tc = phimoe_transformer_config(cfg)
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff == 0.1
    hf = make_hf_model(cfg)
    model = build_and_load(cfg.to_dict(), _convert(tmp_path, hf))
    model.train()
    ids = token_ids(seq=SHORT_SEQ)
    out = model(ids, torch.arange(SHORT_SEQ)[None].expand_as(ids), None)
    out.float().mean().backward()
    assert model.decoder.layers[1].mlp.router.weight.grad.abs().sum() > 0


def test_phi35_moe_shape_builds_on_meta(world1):
    """The released Phi-3.5-MoE shape (4.x config.json style; factor lists synthetic) builds with CE
    (theta_down has its true size ffn 6400 > d 4096) on the meta device."""
    from megatron_ce.models.phimoe import build_phimoe_model

    cfg = {
        "model_type": "phimoe", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 6400,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 16, "num_experts_per_tok": 2, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": 131072, "attention_bias": True, "lm_head_bias": True, "hidden_act": "silu",
        "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "tie_word_embeddings": False,
        "rope_scaling": {
            "type": "longrope", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64,
            "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
            "original_max_position_embeddings": 4096,
        },
    }
    with torch.device("meta"):
        model = build_phimoe_model(cfg, moe_ce_num_compressed=1, perform_initialization=False)
    params = dict(model.named_parameters())
    assert params["decoder.layers.0.mlp.ce.down"].shape == (16, 6400)
    assert params["output_layer.bias"].shape == (32064,)
    assert params["decoder.layers.31.self_attention.linear_proj.bias"].shape == (4096,)
    assert params["decoder.layers.0.self_attention.linear_qkv.bias"].shape == (4096 + 2 * 1024,)
    assert "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.bias" not in params
    n = sum(p.numel() for p in params.values())
    assert 41.8e9 < n < 42.0e9, n  # Phi-3.5-MoE: ~41.9B parameters
