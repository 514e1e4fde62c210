"""HF CE modeling code (megatron_ce/hf): parity with the mcore CE model through the export, the
theta = 1 identity against an independent stock top-k_m model, and trust_remote_code loading."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megatron_ce.convert import META_NAME, convert_hf_to_megatron, convert_megatron_to_hf
from tests.models.families import (
    build_and_load,
    load_safetensors_dir,
    make_hf_model,
    mcore_logits,
    tiny_olmoe_config,
    token_ids,
)

TOL = 1e-4
K_A = 2
CE_ROLES = {"ia3": {"gate": "d", "up": "d", "down": "ffn"}, "hidden": {"hidden": "d"}}


def _cfg(**kw):
    # 6 experts, top-4 -> 2 main + 2 compressed (aux renormalisation over 2 experts matters);
    # ffn 48 > d 32 (theta_down has its true size)
    return tiny_olmoe_config(num_experts=6, num_experts_per_tok=4, **kw)


def _random_thetas(cfg, variant, seed=7):
    g = torch.Generator().manual_seed(seed)
    size = {"d": cfg.hidden_size, "ffn": cfg.intermediate_size}
    return {
        f"model.layers.{l}.mlp.ce.{role}": 1.0 + 0.5 * torch.randn(cfg.num_experts, size[w], generator=g)
        for l in range(cfg.num_hidden_layers)
        for role, w in CE_ROLES[variant].items()
    }


def _hf_ce_dir(tmp_path, cfg, variant, thetas=None, seed=0):
    """A stock OLMoE dir (per-expert names on disk) plus CE fields in config.json and (optionally)
    CE tables."""
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


# ---------------------------------------------------------------------------- (a) + (c)


@pytest.mark.parametrize("variant,norm_topk_prob", [("ia3", False), ("hidden", False), ("ia3", True)])
def test_mcore_ce_equals_exported_hf_ce(world1, tmp_path, variant, norm_topk_prob):
    """Random non-unit theta: mcore CE model (from a dist checkpoint) and the HF CE model exported
    from that checkpoint, loaded with AutoModelForCausalLM + trust_remote_code from a copy of the
    export directory, give the same fp32 logits; every tensor loads (no missing/unexpected keys)."""
    cfg = _cfg(norm_topk_prob=norm_topk_prob)
    thetas = _random_thetas(cfg, variant)
    src = _hf_ce_dir(tmp_path, cfg, variant, thetas)
    ckpt = convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    assert json.loads((tmp_path / "mc" / META_NAME).read_text())["ce_source"] == "checkpoint"
    ids = token_ids(vocab=cfg.vocab_size)
    mc = mcore_logits(build_and_load(cfg.to_dict(), ckpt, ce=K_A, variant=variant), ids)

    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "export", progress=False)
    conf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert conf["architectures"] == ["OlmoeCEForCausalLM"]
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_olmoe_ce.OlmoeCEForCausalLM"
    assert conf["moe_ce_num_compressed"] == K_A and conf["moe_ce_variant"] == variant
    # the directory is self-contained: load a copy elsewhere
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "export", moved)
    model, info = _load_remote(moved)
    assert _no_problems(info), info
    assert type(model).__name__ == "OlmoeCEForCausalLM" and not type(model).__module__.startswith("megatron_ce")
    sd = model.state_dict()
    for k, t in thetas.items():
        assert torch.equal(sd[k], t), k
    hf = _logits(model, ids)
    diff = (hf - mc).abs().max().item()
    assert diff <= TOL, f"mcore CE vs exported HF CE: max abs diff {diff}"

    # theta matters: the same model with theta = 1 is clearly different
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp.ce." in n:
                p.fill_(1.0)
    assert (_logits(model, ids) - hf).abs().max().item() > 1e-2


def test_non_ce_export_stays_stock(tmp_path):
    cfg = _cfg()
    src = tmp_path / "src"
    make_hf_model(cfg).save_pretrained(src)
    convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "export", progress=False)
    conf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert conf["architectures"] == ["OlmoeForCausalLM"] and "auto_map" not in conf
    assert not any(f.endswith(".py") for f in os.listdir(tmp_path / "export"))
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "export")).__name__ == "OlmoeForCausalLM"


def test_ce_export_reimports_and_save_pretrained_round_trip(tmp_path):
    """The exported CE dir converts back to Megatron (CE tables from the checkpoint), and the HF CE
    model's save_pretrained writes the per-expert names plus ce.* (same tensors as the export)."""
    cfg = _cfg()
    thetas = _random_thetas(cfg, "ia3")
    src = _hf_ce_dir(tmp_path, cfg, "ia3", thetas)
    convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "export", progress=False)
    convert_hf_to_megatron(tmp_path / "export", tmp_path / "mc2", progress=False)
    assert json.loads((tmp_path / "mc2" / META_NAME).read_text())["ce_source"] == "checkpoint"

    # --hf-config given the CE export's config.json (model_type olmoe_ce) reads it as olmoe
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "export2", hf_config=str(tmp_path / "export" / "config.json"), progress=False)
    assert json.loads((tmp_path / "export2" / "config.json").read_text())["model_type"] == "olmoe_ce"

    from transformers import AutoModelForCausalLM

    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "olmoe_ce"
    with pytest.raises(ValueError, match="trust_remote_code|olmoe_ce"):  # never a silent stock model
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    model, info = _load_remote(tmp_path / "export")
    assert _no_problems(info), info
    model.save_pretrained(tmp_path / "saved")
    a, b = load_safetensors_dir(tmp_path / "export"), load_safetensors_dir(tmp_path / "saved")
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in b and "model.layers.1.mlp.ce.down" in b
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- (b) theta = 1


def _stock_topk_main(stock, k_main):
    """Independent reference: the stock model whose router keeps only the first k_main experts of
    its top-k ranking, each with the weight it had under top-k routing (raw softmax probs, or
    renormalised over the full top-k when norm_topk_prob) -- docs/METHOD.md §1.7."""

    def make_forward(router):
        def forward(hidden_states):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(hidden_states, router.weight)
            probs = torch.softmax(logits.double(), dim=-1)
            top_p, top_i = torch.topk(probs, router.top_k, dim=-1)
            if router.norm_topk_prob:
                top_p = top_p / top_p.sum(-1, keepdim=True)
            return logits, top_p[:, :k_main].to(logits.dtype), top_i[:, :k_main]

        return forward

    for layer in stock.model.layers:
        layer.mlp.gate.forward = make_forward(layer.mlp.gate)
    return stock


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_theta_one_equals_stock_topk_main(tmp_path, variant, norm_topk_prob):
    """A CE config over a plain OLMoE checkpoint (no ce.* tensors): the CE tables initialise to
    exactly 1 (docs/METHOD.md §1.9a) and the CE model equals the stock top-k_m model."""
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM
    from transformers import OlmoeForCausalLM

    cfg = _cfg(norm_topk_prob=norm_topk_prob)
    src = _hf_ce_dir(tmp_path, cfg, variant, thetas=None)
    model, info = OlmoeCEForCausalLM.from_pretrained(src, output_loading_info=True)
    want_missing = {f"model.layers.{l}.mlp.ce.{r}" for l in range(2) for r in CE_ROLES[variant]}
    assert set(info["missing_keys"]) == want_missing and not info["unexpected_keys"], info
    for n, p in model.named_parameters():
        if ".mlp.ce." in n:
            assert torch.equal(p, torch.ones_like(p)), n

    ids = token_ids(vocab=cfg.vocab_size)
    ce = _logits(model.eval(), ids)
    stock = OlmoeForCausalLM.from_pretrained(src).eval()
    full_topk = _logits(stock, ids)
    ref = _logits(_stock_topk_main(stock, cfg.num_experts_per_tok - K_A), ids)
    diff = (ce - ref).abs().max().item()
    assert diff <= 1e-5, f"CE(theta=1) vs stock top-k_m: {diff}"
    assert (ce - full_topk).abs().max().item() > 1e-2  # the reference really drops the aux experts


def test_no_compressed_equals_stock_and_router_logits(tmp_path):
    """k_a = 0: the CE model is the stock model; output_router_logits still records the router."""
    from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM

    cfg = _cfg()
    stock = make_hf_model(cfg)
    model = OlmoeCEForCausalLM(OlmoeCEConfig(**cfg.to_dict(), moe_ce_num_compressed=0)).eval()
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(".mlp.ce." in k for k in missing)
    ids = token_ids(vocab=cfg.vocab_size)
    assert (_logits(model, ids) - _logits(stock, ids)).abs().max().item() <= 1e-5  # fp32 GEMM order
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == cfg.num_hidden_layers and out.aux_loss is not None


def test_theta_gets_gradients_only_from_aux(tmp_path):
    from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM

    cfg = _cfg()
    model = OlmoeCEForCausalLM(OlmoeCEConfig(**cfg.to_dict(), moe_ce_num_compressed=K_A))
    model.load_state_dict(make_hf_model(cfg).state_dict(), strict=False)
    ids = token_ids(vocab=cfg.vocab_size)
    block = model.model.layers[0].mlp
    captured = {}

    def grab(module, args):
        captured["x"] = args[0].detach().reshape(-1, cfg.hidden_size)

    block.register_forward_pre_hook(grab)
    model(ids).logits.sum().backward()
    _, _, aux_idx, _ = block.route(captured["x"])
    aux = set(aux_idx.flatten().tolist())
    for role in ("gate", "up", "down"):
        g = getattr(block.ce, role).grad
        hit = set(torch.nonzero(g.abs().sum(-1)).flatten().tolist())
        assert hit and hit <= aux, (role, hit, aux)


def test_config_validation_and_reference_alias():
    from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig

    with pytest.raises(ValueError, match="moe_ce_num_compressed=4"):
        OlmoeCEConfig(num_experts_per_tok=4, moe_ce_num_compressed=4)
    with pytest.raises(ValueError, match="moe_ce_variant"):
        OlmoeCEConfig(moe_ce_variant="lora")
    assert OlmoeCEConfig(n_ce=3).moe_ce_num_compressed == 3


def test_modeling_files_are_self_contained():
    import megatron_ce.hf as pkg

    here = os.path.dirname(pkg.__file__)
    for name in ("modeling_olmoe_ce.py", "configuration_olmoe_ce.py", "ce_common.py"):
        text = open(os.path.join(here, name)).read()
        assert "megatron" not in "\n".join(l for l in text.splitlines() if "import" in l), name


def test_install_ce_modeling_unknown_family_warns(tmp_path):
    from megatron_ce.hf import base_model_type, install_ce_modeling

    conf = {"model_type": "mixtral"}
    with pytest.warns(UserWarning, match="no HF CE modeling code for model_type 'mixtral'"):
        assert install_ce_modeling(tmp_path, conf, "mixtral") == {"model_type": "mixtral"}
    assert not os.listdir(tmp_path)
    assert base_model_type("olmoe_ce") == "olmoe" and base_model_type("phimoe") == "phimoe"


def test_generate_with_cache_matches_full_forward():
    """Cached greedy decoding through the CE blocks agrees with a full forward; bf16 runs."""
    from megatron_ce.hf.configuration_olmoe_ce import OlmoeCEConfig
    from megatron_ce.hf.modeling_olmoe_ce import OlmoeCEForCausalLM

    cfg = _cfg()
    model = OlmoeCEForCausalLM(OlmoeCEConfig(**cfg.to_dict(), moe_ce_num_compressed=K_A)).eval()
    model.load_state_dict(make_hf_model(cfg).state_dict(), strict=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp.ce." in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    ids = token_ids(vocab=cfg.vocab_size)[:, :5]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(_logits(model, out)[:, 4:-1].argmax(-1), out[:, 5:])
    assert model.to(torch.bfloat16)(ids).logits.dtype == torch.bfloat16
