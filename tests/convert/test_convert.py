"""HF <-> Megatron conversion: bit-exact round trips, expert layouts, dtypes, CE tables, the reference
`ces` import, the CLI tools, and one test per error."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megatron_ce.convert import (
    META_NAME,
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    supported_model_types,
)
from megatron_ce.convert.dist_io import DistCheckpointReader
from tests.models.families import load_safetensors_dir, make_hf_model, tiny_olmoe_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny OLMoE saved by transformers' save_pretrained, in 2 KB-ish shards + index."""
    d = tmp_path_factory.mktemp("olmoe") / "hf"
    make_hf_model(tiny_olmoe_config()).save_pretrained(d, max_shard_size="40KB")
    return d


def _assert_same_tensors(a_dir, b_dir):
    a, b = load_safetensors_dir(a_dir), load_safetensors_dir(b_dir)
    assert sorted(a) == sorted(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, bad


def _round_trip(src, tmp_path, **kw):
    convert_hf_to_megatron(src, tmp_path / "mc", progress=False, **kw)
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    return tmp_path / "back"


# ---------------------------------------------------------------------------- round trips


def test_save_pretrained_writes_per_expert_names(hf_dir):
    """transformers 5.x save_pretrained keeps the 4.x per-expert names on disk (what we read/write)."""
    names = load_safetensors_dir(hf_dir)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def test_round_trip_sharded_fp32_bit_exact(hf_dir, tmp_path):
    back = _round_trip(hf_dir, tmp_path)
    _assert_same_tensors(hf_dir, back)
    from transformers import OlmoeForCausalLM

    model, info = OlmoeForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = json.loads((hf_dir / "config.json").read_text())
    got = json.loads((back / "config.json").read_text())
    for k in ("hidden_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps", "vocab_size"):
        assert got[k] == ref[k]
    # generation config (and tokenizer files, when present) travel beside the Megatron checkpoint
    assert (tmp_path / "mc" / "hf_files" / "generation_config.json").exists()
    assert (back / "generation_config.json").read_text() == (hf_dir / "generation_config.json").read_text()


def test_existing_outputs_are_not_overwritten(hf_dir, tmp_path):
    convert_hf_to_megatron(hf_dir, tmp_path / "mc", progress=False)
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        convert_hf_to_megatron(hf_dir, tmp_path / "mc", progress=False)
    with pytest.raises(ConversionError, match="already holds safetensors"):
        convert_megatron_to_hf(tmp_path / "mc", hf_dir, progress=False)


def test_round_trip_single_file_bf16_bit_exact(tmp_path):
    src = tmp_path / "hf"
    make_hf_model(tiny_olmoe_config()).to(torch.bfloat16).save_pretrained(src)
    assert (src / "model.safetensors").exists()
    back = _round_trip(src, tmp_path)
    _assert_same_tensors(src, back)
    ck = DistCheckpointReader(tmp_path / "mc" / "release")
    assert ck.dtype("decoder.layers.self_attention.linear_qkv.weight") == torch.bfloat16
    assert (back / "model.safetensors").exists() and not (back / "model.safetensors.index.json").exists()


def test_fused_5x_layout_on_disk_reads_like_per_expert(hf_dir, tmp_path):
    """A checkpoint written from transformers 5.x's in-memory state dict (fused experts) converts to
    the same Megatron checkpoint; the export is per-expert."""
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM.from_pretrained(hf_dir)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(hf_dir / "config.json", fused)
    back = _round_trip(fused, tmp_path)
    _assert_same_tensors(hf_dir, back)


def test_dtype_flag_casts(hf_dir, tmp_path):
    ck = convert_hf_to_megatron(hf_dir, tmp_path / "mc", dtype="bf16", progress=False)
    assert DistCheckpointReader(ck).dtype("decoder.layers.mlp.router.weight") == torch.bfloat16
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "back", dtype="fp32", progress=False)
    back = load_safetensors_dir(tmp_path / "back")
    src = load_safetensors_dir(hf_dir)
    assert all(t.dtype == torch.float32 for t in back.values())
    assert torch.equal(back["lm_head.weight"], src["lm_head.weight"].to(torch.bfloat16).float())


def test_one_file_per_layer(hf_dir, tmp_path):
    ck = convert_hf_to_megatron(hf_dir, tmp_path / "mc", progress=False)
    files = [f for f in os.listdir(ck) if f.endswith(".distcp")]
    # embedding, 2 layers, final norm + output layer, module extra states
    assert len(files) == 5, files
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text() == "release"
    meta = json.loads((tmp_path / "mc" / META_NAME).read_text())
    assert meta["model_type"] == "olmoe" and meta["moe_ce_num_compressed"] == 0


# ---------------------------------------------------------------------------- CE tables


@pytest.mark.parametrize("variant,tables", [("ia3", {"gate": 32, "up": 32, "down": 48}), ("hidden", {"hidden": 32})])
def test_ce_tables_initialised_to_ones_and_exported(hf_dir, tmp_path, variant, tables):
    ck = convert_hf_to_megatron(hf_dir, tmp_path / "mc", moe_ce_num_compressed=1, moe_ce_variant=variant, progress=False)
    reader = DistCheckpointReader(ck)
    for role, width in tables.items():
        key = f"decoder.layers.mlp.ce.{role}"
        assert reader.shape(key) == (2, 4, width)
        (t,) = reader.read([(key, (0, 0, 0), (2, 4, width))])
        assert torch.equal(t, torch.ones_like(t))
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    back = load_safetensors_dir(tmp_path / "back")
    for l in range(2):
        for role, width in tables.items():
            assert torch.equal(back[f"model.layers.{l}.mlp.ce.{role}"], torch.ones(4, width))
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert conf["moe_ce_num_compressed"] == 1 and conf["moe_ce_variant"] == variant
    # our CE export converts back (tables read from the checkpoint, k_a / variant from config.json)
    convert_hf_to_megatron(tmp_path / "back", tmp_path / "mc2", progress=False)
    assert json.loads((tmp_path / "mc2" / META_NAME).read_text())["ce_source"] == "checkpoint"
    convert_megatron_to_hf(tmp_path / "mc2", tmp_path / "back2", progress=False)
    _assert_same_tensors(tmp_path / "back", tmp_path / "back2")


def _reference_ckpt(tmp_path, cfg, n_ce=2, seed=3):
    """An HF dir as the reference implementation saves it: OLMoE + `mlp.ces` [n, 3, d] + n_ce."""
    src = tmp_path / "ref"
    make_hf_model(cfg).save_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    ces = {f"model.layers.{l}.mlp.ces": torch.randn(cfg.num_experts, 3, cfg.hidden_size, generator=g) for l in range(cfg.num_hidden_layers)}
    sd = load_safetensors_dir(src)
    sd.update(ces)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    conf["n_ce"] = n_ce
    (src / "config.json").write_text(json.dumps(conf))
    return src, ces


def test_reference_ces_import(tmp_path):
    cfg = tiny_olmoe_config(num_experts_per_tok=3, intermediate_size=24)  # the reference needs ffn <= d
    src, ces = _reference_ckpt(tmp_path, cfg)
    ck = convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    meta = json.loads((tmp_path / "mc" / META_NAME).read_text())
    assert meta["moe_ce_num_compressed"] == 2 and meta["ce_source"] == "reference"
    reader = DistCheckpointReader(ck)
    for l in range(2):
        c = ces[f"model.layers.{l}.mlp.ces"]
        gate, up, down = reader.read(
            [
                ("decoder.layers.mlp.ce.gate", (l, 0, 0), (1, 4, 32)),
                ("decoder.layers.mlp.ce.up", (l, 0, 0), (1, 4, 32)),
                ("decoder.layers.mlp.ce.down", (l, 0, 0), (1, 4, 24)),
            ]
        )
        assert torch.equal(gate[0], c[:, 0]) and torch.equal(up[0], c[:, 2]) and torch.equal(down[0], c[:, 1, :24])


def test_config_declaring_ce_without_tables_is_an_error(hf_dir, tmp_path):
    src = tmp_path / "x"
    shutil.copytree(hf_dir, src)
    conf = json.loads((src / "config.json").read_text())
    conf["n_ce"] = 1
    (src / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConversionError, match="declares 1 compressed experts but the checkpoint has no CE tables"):
        convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    # the flag asks for new tables: created as ones
    convert_hf_to_megatron(src, tmp_path / "mc", moe_ce_num_compressed=1, progress=False)
    assert json.loads((tmp_path / "mc" / META_NAME).read_text())["ce_source"] == "ones"


def test_reference_ces_import_errors(tmp_path):
    src, _ = _reference_ckpt(tmp_path, tiny_olmoe_config(num_experts_per_tok=3))  # ffn 48 > d 32
    with pytest.raises(ConversionError, match="ffn=48"):
        convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    src2, _ = _reference_ckpt(tmp_path / "b", tiny_olmoe_config(num_experts_per_tok=3, intermediate_size=24))
    with pytest.raises(ConversionError, match="variant=hidden"):
        convert_hf_to_megatron(src2, tmp_path / "mc2", moe_ce_variant="hidden", progress=False)


# ---------------------------------------------------------------------------- errors


def test_missing_unexpected_misshaped_in_one_error(hf_dir, tmp_path):
    src = tmp_path / "bad"
    sd = load_safetensors_dir(hf_dir)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.mlp.gate.weight"] = torch.zeros(5, 32)
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(hf_dir / "config.json", src)
    with pytest.raises(ConversionError) as e:
        convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    msg = str(e.value)
    assert "missing (1): model.layers.1.self_attn.k_proj.weight" in msg
    assert "unexpected (1): model.layers.0.mlp.extra.weight" in msg
    assert "mis-shaped (1): model.layers.0.mlp.gate.weight [5, 32] (expected [4, 32])" in msg
    assert not (tmp_path / "mc").exists()  # nothing written


def test_unknown_model_type_names_supported(hf_dir, tmp_path):
    src = tmp_path / "x"
    shutil.copytree(hf_dir, src)
    conf = json.loads((src / "config.json").read_text())
    conf["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConversionError, match=r"unknown model_type 'llama'; supported: olmoe"):
        convert_hf_to_megatron(src, tmp_path / "mc", progress=False)
    with pytest.raises(ConversionError, match="unknown model_type 'mixtral'"):
        convert_hf_to_megatron(hf_dir, tmp_path / "mc", model_type="mixtral", progress=False)
    assert "olmoe" in supported_model_types()


def test_pickle_weights_refused(tmp_path, hf_dir):
    src = tmp_path / "pkl"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match="only safetensors"):
        convert_hf_to_megatron(src, tmp_path / "mc", progress=False)


def test_missing_config_and_bad_dtype(tmp_path, hf_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_hf_to_megatron(tmp_path / "empty", tmp_path / "mc", progress=False)
    with pytest.raises(ConversionError, match="--dtype='fp8'"):
        convert_hf_to_megatron(hf_dir, tmp_path / "mc", dtype="fp8", progress=False)


def test_megatron_side_errors(hf_dir, tmp_path):
    convert_hf_to_megatron(hf_dir, tmp_path / "mc", moe_ce_num_compressed=1, progress=False)
    # CE tables in the checkpoint that the description does not declare
    with pytest.raises(ConversionError, match=r"unexpected \(3\): decoder.layers.mlp.ce.down"):
        convert_megatron_to_hf(tmp_path / "mc", tmp_path / "o1", moe_ce_num_compressed=0, progress=False)
    # declared CE variant that is not in the checkpoint
    with pytest.raises(ConversionError, match=r"missing \(1\): decoder.layers.mlp.ce.hidden"):
        convert_megatron_to_hf(tmp_path / "mc", tmp_path / "o2", moe_ce_variant="hidden", progress=False)
    # a different model shape
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="mis-shaped"):
        convert_megatron_to_hf(tmp_path / "mc", tmp_path / "o3", hf_config=str(tmp_path / "other.json"), progress=False)
    # no model description
    os.remove(tmp_path / "mc" / META_NAME)
    os.remove(tmp_path / "mc" / "release" / META_NAME)
    with pytest.raises(ConversionError, match="--hf-config"):
        convert_megatron_to_hf(tmp_path / "mc", tmp_path / "o4", progress=False)
    with pytest.raises(ConversionError, match="neither a dist checkpoint"):
        convert_megatron_to_hf(hf_dir, tmp_path / "o5", progress=False)


# ---------------------------------------------------------------------------- CLI


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_round_trip_and_error(hf_dir, tmp_path, capsys):
    to_mc, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    assert to_mc.main(["--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "mc"), "--no-progress"]) == 0
    assert to_hf.main(["--load-dir", str(tmp_path / "mc"), "--save-dir", str(tmp_path / "back"),
                       "--max-shard-size", "40KB", "--no-progress"]) == 0
    _assert_same_tensors(hf_dir, tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    rc = to_mc.main(["--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "x"), "--model-type", "nope", "--no-progress"])
    assert rc == 2 and "unknown model_type 'nope'" in capsys.readouterr().err
    rc = to_mc.main(["--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "y"),
                     "--moe-ce-num-compressed", "2", "--no-progress"])  # k_a must be < top-k = 2
    assert rc == 2 and "--moe-ce-num-compressed=2 must be < --moe-router-topk=2" in capsys.readouterr().err
