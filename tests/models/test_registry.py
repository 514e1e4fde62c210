"""megatron_ce.models.registry: one Family per package; its presets, CE export metadata and builder are
what the paper tools, the HF export, launch/plan.py and the benchmark read."""

import json

import pytest

from megatron_ce.models import registry

# the shape fields of the paper models as three names: HF config key, launch preset key, bench key
SHAPE_KEYS = [("hidden_size", "hidden_size", "d"), ("intermediate_size", "intermediate_size", "ffn"),
              ("num_experts_per_tok", "num_experts_per_tok", "k")]


def test_builtin_families_are_registered():
    assert registry.builtin_model_types() == registry.supported_model_types() == ["olmoe", "phimoe"]


@pytest.mark.parametrize("mt", ["olmoe", "phimoe"])
def test_family_declares_one_set_of_presets(mt):
    fam = registry.get_family(mt)
    assert fam.model_type == mt
    assert fam.presets is registry.presets(mt) and fam.ce_export is registry.ce_export(mt)
    p = fam.presets
    paper, launch, bench = p.paper_hf_config, p.launch, p.bench_shape
    assert paper["model_type"] == mt
    for hf_key, launch_key, bench_key in SHAPE_KEYS:
        assert paper[hf_key] == launch[launch_key] == bench[bench_key], hf_key
    experts = paper.get("num_experts") or paper.get("num_local_experts")
    assert experts == bench["n"] == (launch.get("num_experts") or launch.get("num_local_experts"))
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert paper[key] == launch[key], key
    assert launch["qk_norm"] is (mt == "olmoe")  # OLMoE's full-width QK-norm; Phi-MoE has none


def test_ce_export_names_map_back():
    assert registry.base_model_type("olmoe_ce") == "olmoe"
    assert registry.base_model_type("phimoe_ce") == "phimoe"
    assert registry.base_model_type("llama") == "llama"
    from megatron_ce.hf import CE_MODELING

    assert CE_MODELING["olmoe"].auto_map["AutoModelForCausalLM"] == "modeling_olmoe_ce.OlmoeCEForCausalLM"


def test_paper_config_of_a_ce_export(tmp_path):
    from megatron_ce.paper.configs import load_model_config

    cfg = dict(registry.presets("phimoe").paper_hf_config, model_type="phimoe_ce")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model_config(str(tmp_path))[0] == "phimoe"
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type 'llama' is not olmoe or phimoe"):
        load_model_config(str(tmp_path))


def test_paper_params_builds_through_the_registry():
    """build_meta_model takes the builder of the family it is given, any registered one."""
    import torch

    from megatron_ce.paper.params import build_meta_model

    seen = {}

    def build(cfg, moe_ce_num_compressed=0, moe_ce_variant="ia3"):
        seen.update(cfg=cfg, k_a=moe_ce_num_compressed, variant=moe_ce_variant)
        return torch.nn.Linear(2, 2)

    fam = registry.Family(model_type="toy", architectures=(), build_model=build, table=lambda c: [],
                          ce=registry.CETables({}, {}))
    registry.register(fam)
    try:
        model = build_meta_model("toy", {"hidden_size": 2}, k_a=1, variant="hidden")
    finally:
        registry._FAMILIES.pop("toy")
    assert seen == {"cfg": {"hidden_size": 2}, "k_a": 1, "variant": "hidden"}
    assert model.weight.device.type == "meta"
