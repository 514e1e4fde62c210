"""Property: for any tiny OLMoE / Phi-MoE (random shapes, GQA, biases, dtype, shard sizes, with or
without CE tables of either variant), HF -> Megatron -> HF gives back the same tensors, bit for bit,
under the same names. The HF side comes from transformers' own models and save_pretrained, so the
names and shapes are not taken from the conversion tables under test."""

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_ce.convert import convert_hf_to_megatron, convert_megatron_to_hf
from tests.models.families import load_safetensors_dir

INDEX = "model.safetensors.index.json"
# Names of our CE export (no transformers model has them): {layer}, {role}.
CE_NAMES = {"olmoe": "model.layers.{layer}.mlp.ce.{role}", "phimoe": "model.layers.{layer}.block_sparse_moe.ce.{role}"}
CE_ROLES = {"ia3": ("gate", "up", "down"), "hidden": ("hidden",)}


@st.composite
def tiny_models(draw):
    family = draw(st.sampled_from(["olmoe", "phimoe"]))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    experts = draw(st.integers(2, 5))
    ce = draw(st.booleans())  # CE needs k_a >= 1 compressed experts, k_a < top-k
    topk = 2 if family == "phimoe" else draw(st.integers(2 if ce else 1, experts))  # Phi-MoE's sparsemixer is top-2
    spec = dict(
        family=family,
        hidden=heads * head_dim,
        heads=heads,
        kv_heads=kv_heads,
        experts=experts,
        topk=topk,
        ffn=draw(st.integers(1, 20)),
        layers=draw(st.integers(1, 3)),
        vocab=draw(st.integers(4, 40)),
        k_a=draw(st.integers(1, topk - 1)) if ce else 0,  # compressed experts: 0 = no CE tables
        variant=draw(st.sampled_from(sorted(CE_ROLES))),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        shard_in=draw(st.sampled_from(["1KB", "8KB", "1GB"])),
        shard_out=draw(st.sampled_from(["1KB", "8KB", "1GB"])),
        seed=draw(st.integers(0, 2**16)),
    )
    if family == "phimoe":
        spec.update(attention_bias=draw(st.booleans()), lm_head_bias=draw(st.booleans()))
    return spec


def _hf_model(s):
    common = dict(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], num_experts_per_tok=s["topk"],
        max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    if s["family"] == "olmoe":
        from transformers import OlmoeConfig, OlmoeForCausalLM

        model = OlmoeForCausalLM(OlmoeConfig(num_experts=s["experts"], **common))
    else:
        from transformers import PhimoeConfig, PhimoeForCausalLM

        cfg = PhimoeConfig(num_local_experts=s["experts"], attention_bias=s["attention_bias"],
                           lm_head_bias=s["lm_head_bias"], **common)
        model = PhimoeForCausalLM(cfg)
    # Every weight random and distinct (init leaves norms at 1 and biases at 0: swaps would not show).
    g = torch.Generator().manual_seed(s["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.to(s["dtype"]), g


def _add_ce_tables(d: Path, s, g) -> None:
    """CE tables (our export names) in a shard of their own, listed in the index; config.json declares them."""
    n, f, e = s["hidden"], s["ffn"], s["experts"]
    width = {"gate": n, "up": n, "down": f, "hidden": n}
    tables = {
        CE_NAMES[s["family"]].format(layer=l, role=r): torch.randn(e, width[r], generator=g).to(s["dtype"])
        for l in range(s["layers"])
        for r in CE_ROLES[s["variant"]]
    }
    save_file(tables, str(d / "ce.safetensors"), metadata={"format": "pt"})
    if (d / INDEX).exists():
        index = json.loads((d / INDEX).read_text())
    else:  # save_pretrained wrote one model.safetensors: an index now lists both files
        with safe_open(str(d / "model.safetensors"), framework="pt") as f_:
            index = {"weight_map": {k: "model.safetensors" for k in f_.keys()}}
    index["weight_map"].update({k: "ce.safetensors" for k in tables})
    (d / INDEX).write_text(json.dumps(index))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(moe_ce_num_compressed=s["k_a"], moe_ce_variant=s["variant"])
    (d / "config.json").write_text(json.dumps(cfg))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@settings(max_examples=15, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(tiny_models())
def test_hf_megatron_hf_round_trip_is_identity(s):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, g = _hf_model(s)
        model.save_pretrained(tmp / "hf", max_shard_size=s["shard_in"])
        if s["k_a"]:
            _add_ce_tables(tmp / "hf", s, g)
        convert_hf_to_megatron(tmp / "hf", tmp / "mc", progress=False)
        convert_megatron_to_hf(tmp / "mc", tmp / "back", max_shard_size=s["shard_out"], progress=False)

        src, back = load_safetensors_dir(tmp / "hf"), load_safetensors_dir(tmp / "back")
        assert sorted(back) == sorted(src)
        for name, t in src.items():
            b = back[name]
            assert (b.dtype, b.shape) == (t.dtype, t.shape), name
            assert torch.equal(_bits(b), _bits(t)), name
        cfg = json.loads((tmp / "back" / "config.json").read_text())
        assert cfg.get("moe_ce_num_compressed", 0) == s["k_a"]
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (
            s["hidden"], s["layers"], s["kv_heads"])
