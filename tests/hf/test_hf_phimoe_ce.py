"""HF CE modeling code for Phi-MoE (megatron_ce/hf/modeling_phimoe_ce.py): parity with the mcore
Phi-MoE CE model through the export (random non-unit theta, both variants, short and long LongRoPE
regimes), theta = 1 against an independent stock first-pick model (eval and, with the same RNG
state, training), and trust_remote_code loading with no missing/unexpected keys."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megatron_ce.convert import META_NAME, convert_hf_to_megatron, convert_megatron_to_hf
from tests.models.families import (
    LONG_SEQ,
    SHORT_SEQ,
    build_and_load,
    load_safetensors_dir,
    make_hf_model,
    mcore_logits,
    tiny_phimoe_config,
    token_ids,
)

TOL = 1e-4
K_A = 1  # top-2 sparsemixer -> first pick main, second pick compressed
CE_ROLES = {"ia3": {"gate": "d", "up": "d", "down": "ffn"}, "hidden": {"hidden": "d"}}


def _random_thetas(cfg, variant, seed=7):
    g = torch.Generator().manual_seed(seed)
    size = {"d": cfg.hidden_size, "ffn": cfg.intermediate_size}  # ffn 48 > d 32
    return {
        f"model.layers.{l}.block_sparse_moe.ce.{role}": 1.0
        + 0.5 * torch.randn(cfg.num_local_experts, size[w], generator=g)
        for l in range(cfg.num_hidden_layers)
        for role, w in CE_ROLES[variant].items()
    }


def _hf_ce_dir(tmp_path, cfg, variant, thetas=None, seed=0):
    """A stock Phi-MoE dir (4.x names on disk) plus CE fields in config.json and (optionally) CE tables."""
    src = tmp_path / f"src_{variant}"
    make_hf_model(cfg, seed=seed).save_pretrained(src)
    if thetas is not None:
        sd = load_safetensors_dir(src)
        for f in os.listdir(src):
            if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".json")):
                os.remove(src / f)
        sd.update(thetas)
        save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    conf.update(moe_ce_num_compressed=K_A, moe_ce_variant=variant)
    (src / "config.json").write_text(json.dumps(conf))
    return src


def _no_problems(info):
    return not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))


def _load_remote(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    return model.eval(), info


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _set_ce(model, value=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp.ce." in n:
                p.copy_(torch.ones_like(p) if value == 1 else 1.0 + 0.3 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------- mcore <-> HF export


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_mcore_ce_equals_exported_hf_ce(world1, tmp_path, variant):
    """Random non-unit theta: the mcore Phi-MoE CE model (from a dist checkpoint) and the HF CE model
    exported from it, loaded with AutoModelForCausalLM + trust_remote_code from a copy of the export
    dir, give the same fp32 logits (eval; short and long LongRoPE regimes); every tensor loads."""
    cfg = tiny_phimoe_config()
    thetas = _random_thetas(cfg, variant)
    src = _hf_ce_dir(tmp_path, cfg, variant, thetas)
    ckpt = convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    meta = json.loads((tmp_path / "mc" / META_NAME).read_text())
    assert meta["ce_source"] == "checkpoint" and meta["moe_ce_num_compressed"] == K_A
    mc_model = build_and_load(cfg.to_dict(), ckpt, ce=K_A, variant=variant)

    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "export", progress=False)
    conf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert conf["model_type"] == "phimoe_ce" and conf["architectures"] == ["PhimoeCEForCausalLM"]
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_phimoe_ce.PhimoeCEForCausalLM"
    assert conf["moe_ce_num_compressed"] == K_A and conf["moe_ce_variant"] == variant
    moved = tmp_path / "elsewhere" / "model"  # the directory is self-contained
    shutil.copytree(tmp_path / "export", moved)
    model, info = _load_remote(moved)
    assert _no_problems(info), info
    assert type(model).__name__ == "PhimoeCEForCausalLM" and not type(model).__module__.startswith("megatron_ce")
    sd = model.state_dict()
    for k, t in thetas.items():
        assert torch.equal(sd[k.replace(".block_sparse_moe.", ".mlp.")], t), k

    for seq in (SHORT_SEQ, LONG_SEQ):
        ids = token_ids(seq=seq, vocab=cfg.vocab_size)
        mc = mcore_logits(mc_model, ids)
        hf = _logits(model, ids)
        diff = (hf - mc).abs().max().item()
        print(f"[{variant}] seq {seq}: max |hf - mcore| = {diff:.2e}")
        assert diff <= TOL, f"seq {seq}: mcore CE vs exported HF CE: max abs diff {diff}"
        assert hf.abs().max() > 1.0

    # theta matters: the same model with theta = 1 is clearly different
    _set_ce(model, 1)
    assert (_logits(model, ids) - hf).abs().max().item() > 1e-2


def test_export_save_pretrained_round_trip_and_reimport(tmp_path):
    """The HF CE model's save_pretrained writes 4.x names plus block_sparse_moe.ce.* (same tensors as
    the export); the export converts back to Megatron with the CE tables from the checkpoint; without
    trust_remote_code the dir is refused (never a silent stock model)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_phimoe_config()
    thetas = _random_thetas(cfg, "ia3")
    src = _hf_ce_dir(tmp_path, cfg, "ia3", thetas)
    convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "export", progress=False)
    convert_hf_to_megatron(tmp_path / "export", tmp_path / "mc2", progress=False)
    assert json.loads((tmp_path / "mc2" / META_NAME).read_text())["ce_source"] == "checkpoint"
    with pytest.raises(ValueError, match="trust_remote_code|phimoe_ce"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    model, info = _load_remote(tmp_path / "export")
    assert _no_problems(info), info
    model.save_pretrained(tmp_path / "saved")
    a, b = load_safetensors_dir(tmp_path / "export"), load_safetensors_dir(tmp_path / "saved")
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in b
    assert b["model.layers.1.block_sparse_moe.ce.down"].shape == (cfg.num_local_experts, cfg.intermediate_size)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- theta = 1


def _first_pick_only(stock):
    """Independent reference: the stock model whose router keeps only the first sparsemixer pick,
    with the weight the sparsemixer gives it (transformers' own sparsemixer, truncated)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    def make_forward(router):
        def forward(hidden_states):
            if router.training and router.input_jitter_noise > 0:  # as PhimoeTopKRouter.forward
                hidden_states *= torch.empty_like(hidden_states).uniform_(
                    1.0 - router.input_jitter_noise, 1.0 + router.input_jitter_noise
                )
            logits = torch.nn.functional.linear(hidden_states, router.weight)
            w, sel = sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=router.training)
            return logits, w[:, :1], sel[:, :1]

        return forward

    for layer in stock.model.layers:
        layer.mlp.router.forward = make_forward(layer.mlp.router)
    return stock


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_theta_one_equals_stock_first_pick(tmp_path, variant):
    """A CE config over a plain Phi-MoE checkpoint (no ce.* tensors): the CE tables initialise to
    exactly 1 and the CE model equals the stock model cut to its first sparsemixer pick."""
    from transformers import PhimoeForCausalLM

    from megatron_ce.hf.modeling_phimoe_ce import PhimoeCEForCausalLM

    cfg = tiny_phimoe_config()
    src = _hf_ce_dir(tmp_path, cfg, variant, thetas=None)
    model, info = PhimoeCEForCausalLM.from_pretrained(src, output_loading_info=True)
    want_missing = {f"model.layers.{l}.mlp.ce.{r}" for l in range(cfg.num_hidden_layers) for r in CE_ROLES[variant]}
    assert set(info["missing_keys"]) == want_missing and not info["unexpected_keys"], info
    for n, p in model.named_parameters():
        if ".mlp.ce." in n:
            assert torch.equal(p, torch.ones_like(p)), n
    model.eval()
    stock = PhimoeForCausalLM.from_pretrained(src).eval()
    for seq in (SHORT_SEQ, LONG_SEQ):
        ids = token_ids(seq=seq, vocab=cfg.vocab_size)
        full = _logits(stock, ids)
        ref = _logits(_first_pick_only(PhimoeForCausalLM.from_pretrained(src).eval()), ids)
        ce = _logits(model, ids)
        diff = (ce - ref).abs().max().item()
        assert diff <= 1e-5, f"seq {seq}: CE(theta=1) vs stock first pick: {diff}"
        assert (ce - full).abs().max().item() > 1e-2  # the reference really drops the second pick


def test_training_path_is_transformers(tmp_path):
    """Training mode (Gumbel picks, 1.0/0.3333 multiplier, custom backward, input jitter in block and
    router): with theta = 1 and the same RNG state, the CE model equals the stock model cut to its first
    pick (loss and router gradients); theta gets gradients only through second picks."""

    from megatron_ce.hf.configuration_phimoe_ce import PhimoeCEConfig
    from megatron_ce.hf.modeling_phimoe_ce import PhimoeCEForCausalLM

    cfg = tiny_phimoe_config(input_jitter_noise=0.05)
    stock = make_hf_model(cfg)
    model = PhimoeCEForCausalLM(PhimoeCEConfig(**cfg.to_dict(), moe_ce_num_compressed=K_A))
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(".mlp.ce." in k for k in missing)
    _set_ce(model, 1)
    ref = _first_pick_only(stock)
    ids = token_ids(seq=SHORT_SEQ, vocab=cfg.vocab_size)
    out = {}
    for name, m in (("ce", model), ("ref", ref)):
        m.train()
        torch.manual_seed(11)
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads = torch.stack([layer.mlp.router.weight.grad for layer in m.model.layers])
        out[name] = (loss.detach(), grads.clone())
    assert torch.allclose(out["ce"][0], out["ref"][0], rtol=0, atol=1e-6), (out["ce"][0], out["ref"][0])
    assert torch.allclose(out["ce"][1], out["ref"][1], rtol=1e-5, atol=1e-6)
    assert out["ce"][1].abs().sum() > 0  # (the first pick's custom backward; zero where it had no rival)

    # theta gradients only from aux (second-pick) experts
    model.zero_grad()
    model.eval()
    block = model.model.layers[0].mlp
    captured = {}
    block.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach().reshape(-1, cfg.hidden_size)))
    model(ids).logits.sum().backward()
    _, _, aux_idx, _ = block.route(captured["x"].clone())
    aux = set(aux_idx.flatten().tolist())
    for role in ("gate", "up", "down"):
        g = getattr(block.ce, role).grad
        hit = set(torch.nonzero(g.abs().sum(-1)).flatten().tolist())
        assert hit and hit <= aux, (role, hit, aux)


def test_no_compressed_equals_stock_and_router_logits():
    """k_a = 0: the CE model is the stock model; output_router_logits still records the router."""
    from megatron_ce.hf.configuration_phimoe_ce import PhimoeCEConfig
    from megatron_ce.hf.modeling_phimoe_ce import PhimoeCEForCausalLM

    cfg = tiny_phimoe_config()
    stock = make_hf_model(cfg)
    model = PhimoeCEForCausalLM(PhimoeCEConfig(**cfg.to_dict(), moe_ce_num_compressed=0)).eval()
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(".mlp.ce." in k for k in missing)
    ids = token_ids(seq=SHORT_SEQ, vocab=cfg.vocab_size)
    assert torch.equal(_logits(model, ids), _logits(stock, ids))
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == cfg.num_hidden_layers and out.aux_loss is not None


def test_generate_with_cache_matches_full_forward():
    """Cached greedy decoding through the CE blocks agrees with a full forward; bf16 runs."""
    from megatron_ce.hf.configuration_phimoe_ce import PhimoeCEConfig
    from megatron_ce.hf.modeling_phimoe_ce import PhimoeCEForCausalLM

    cfg = tiny_phimoe_config()
    model = PhimoeCEForCausalLM(PhimoeCEConfig(**cfg.to_dict(), moe_ce_num_compressed=K_A)).eval()
    model.load_state_dict(make_hf_model(cfg).state_dict(), strict=False)
    _set_ce(model)
    ids = token_ids(seq=SHORT_SEQ, vocab=cfg.vocab_size)[:, :5]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(_logits(model, out)[:, 4:-1].argmax(-1), out[:, 5:])
    assert model.to(torch.bfloat16)(ids).logits.dtype == torch.bfloat16


def test_config_validation_and_registration(tmp_path):
    from megatron_ce.hf import CE_MODELING, base_model_type, install_ce_modeling
    from megatron_ce.hf.configuration_phimoe_ce import PhimoeCEConfig

    with pytest.raises(ValueError, match="moe_ce_num_compressed=2"):
        PhimoeCEConfig(moe_ce_num_compressed=2)
    with pytest.raises(ValueError, match="moe_ce_variant"):
        PhimoeCEConfig(moe_ce_variant="lora")
    assert PhimoeCEConfig(n_ce=1).moe_ce_num_compressed == 1
    assert "phimoe" in CE_MODELING and base_model_type("phimoe_ce") == "phimoe"
    conf = install_ce_modeling(tmp_path, {"model_type": "phimoe"}, "phimoe")
    assert conf["model_type"] == "phimoe_ce" and sorted(os.listdir(tmp_path)) == [
        "ce_common.py",
        "configuration_phimoe_ce.py",
        "modeling_phimoe_ce.py",
    ]
    here = os.path.dirname(install_ce_modeling.__code__.co_filename)
    for name in ("modeling_phimoe_ce.py", "configuration_phimoe_ce.py", "ce_common.py"):
        text = open(os.path.join(here, name)).read()
        assert "megatron" not in "\n".join(l for l in text.splitlines() if "import" in l), name


def test_phi35_shape_theta_down_has_ffn_size():
    """Phi-3.5-MoE shape (2 layers, meta device): theta_down has its true size ffn 6400 > d 4096."""
    from megatron_ce.hf.configuration_phimoe_ce import PhimoeCEConfig
    from megatron_ce.hf.modeling_phimoe_ce import PhimoeCEForCausalLM

    cfg = PhimoeCEConfig(moe_ce_num_compressed=1, num_hidden_layers=2, attention_bias=True, lm_head_bias=True)
    with torch.device("meta"):
        params = dict(PhimoeCEForCausalLM(cfg).named_parameters())
    assert params["model.layers.1.mlp.ce.down"].shape == (16, 6400)
    assert params["model.layers.1.mlp.ce.gate"].shape == params["model.layers.1.mlp.ce.up"].shape == (16, 4096)
