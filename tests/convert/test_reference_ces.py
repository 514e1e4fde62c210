"""The reference implementation's CE checkpoint format (HF OLMoE + `mlp.ces` [n, 3, d] + config `n_ce`):
import through the CLI, and export to it (`convert_megatron_to_hf.py --format reference`).

Independent of our own reading of the `ces` layout: the model below computes the reference's MoE
block from its published forward, written here from docs/METHOD.md §1.8 (not from megatron_ce):
`OlmoeCEMLP.forward(x, e1, e2, e3) = down_proj((act(gate_proj(x*e1)) * up_proj(x*e3)) * e2)` with
e1 = ces[:, 0], e2 = ces[:, 1, :ffn], e3 = ces[:, 2], each mixed over the token's auxiliary experts.
Its weights are read by the reference's on-disk names (OLMoE 4.x per-expert + mlp.ces).
"""

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tests.models.families import load_safetensors_dir, make_hf_model, tiny_olmoe_config, token_ids

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_CE = 2
TOL = 1e-5  # fp32, relative to the largest logit


def _cfg(**kw):
    # 6 experts, top-4: 2 main + 2 aux per token; ffn 24 <= d 32 (the reference layout needs it)
    return tiny_olmoe_config(num_experts=6, num_experts_per_tok=4, intermediate_size=24, **kw)


# ---------------------------------------------------------------------------- reference formula


class ReferenceCEBlock(nn.Module):
    """The reference's OLMoE MoE block with compressed experts, per token, in plain torch."""

    def __init__(self, sd, prefix, n_experts, top_k, n_ce, ffn):
        super().__init__()
        self.router = sd[prefix + "gate.weight"]
        self.experts = [
            tuple(sd[f"{prefix}experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down")) for e in range(n_experts)
        ]
        self.ces = sd[prefix + "ces"]  # [n, 3, d]
        self.top_k, self.n_ce, self.ffn = top_k, n_ce, ffn

    def expert(self, e, x, e1, e2, e3):
        w_gate, w_up, w_down = self.experts[e]
        return F.linear((F.silu(F.linear(x * e1, w_gate)) * F.linear(x * e3, w_up)) * e2, w_down)

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = F.softmax(F.linear(x, self.router), dim=-1, dtype=torch.float32)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)  # sorted, descending
        k_m = self.top_k - self.n_ce
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            aux_w = top_p[t, k_m:] / top_p[t, k_m:].sum()
            c = (aux_w[:, None, None] * self.ces[top_i[t, k_m:]]).sum(0)  # [3, d]
            e1, e2, e3 = c[0], c[1, : self.ffn], c[2]
            for r in range(k_m):  # main experts, raw softmax weights (norm_topk_prob False)
                out[t] += top_p[t, r] * self.expert(int(top_i[t, r]), x[t], e1, e2, e3)
        return out.reshape(shape)


def reference_model(hf_dir):
    """Stock OLMoE (attention, norms, embeddings) with every MoE block replaced by the reference
    formula, all weights read from hf_dir by the reference's names."""
    from transformers import OlmoeForCausalLM

    conf = json.loads((hf_dir / "config.json").read_text())
    assert conf["model_type"] == "olmoe" and conf["n_ce"] == N_CE and conf.get("norm_topk_prob", False) is False
    model = OlmoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sd = load_safetensors_dir(str(hf_dir))
    for l, layer in enumerate(model.model.layers):
        layer.mlp = ReferenceCEBlock(
            sd, f"model.layers.{l}.mlp.", conf["num_experts"], conf["num_experts_per_tok"], conf["n_ce"],
            conf["intermediate_size"],
        )
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------- helpers


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _to_mc(*args):
    return _tool("convert_hf_to_megatron").main([*map(str, args), "--no-progress"])


def _to_hf(*args):
    return _tool("convert_megatron_to_hf").main([*map(str, args), "--no-progress"])


def _save_with(hf_model, path, extra_tensors, extra_config):
    """save_pretrained (4.x per-expert names) plus extra tensors and config fields."""
    hf_model.save_pretrained(path)
    sd = load_safetensors_dir(str(path))
    sd.update(extra_tensors)
    for f in path.glob("*.safetensors*"):
        f.unlink()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((path / "config.json").read_text())
    conf.update(extra_config)
    (path / "config.json").write_text(json.dumps(conf))


def _load_ours(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- tests


def test_reference_checkpoint_imports_with_its_slot_order(tmp_path):
    """A reference checkpoint (random non-unit ces) converted with the CLI and exported back computes,
    through our trust_remote_code model, the logits of the reference formula."""
    cfg = _cfg()
    g = torch.Generator().manual_seed(5)
    ces = {
        f"model.layers.{l}.mlp.ces": 1.0 + 0.5 * torch.randn(cfg.num_experts, 3, cfg.hidden_size, generator=g)
        for l in range(cfg.num_hidden_layers)
    }
    src = tmp_path / "ref"
    _save_with(make_hf_model(cfg), src, ces, {"n_ce": N_CE})
    ids = token_ids(vocab=cfg.vocab_size)
    want = _logits(reference_model(src), ids)

    assert _to_mc("--load-dir", src, "--save-dir", tmp_path / "mc") == 0
    assert json.loads((tmp_path / "mc" / "megatron_ce.json").read_text())["ce_source"] == "reference"
    assert _to_hf("--load-dir", tmp_path / "mc", "--save-dir", tmp_path / "back") == 0
    got = _logits(_load_ours(tmp_path / "back"), ids)
    assert _rel(got, want) <= TOL, _rel(got, want)


def _ours_with_random_theta(tmp_path, cfg, seed=7):
    """An HF dir in our CE export format with random non-unit theta, converted to Megatron."""
    g = torch.Generator().manual_seed(seed)
    n, d, ffn = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    thetas = {}
    for l in range(cfg.num_hidden_layers):
        for role, width in (("gate", d), ("up", d), ("down", ffn)):
            thetas[f"model.layers.{l}.mlp.ce.{role}"] = 1.0 + 0.5 * torch.randn(n, width, generator=g)
    src = tmp_path / "ours"
    _save_with(make_hf_model(cfg), src, thetas, {"moe_ce_num_compressed": N_CE, "moe_ce_variant": "ia3"})
    assert _to_mc("--load-dir", src, "--save-dir", tmp_path / "mc") == 0
    assert json.loads((tmp_path / "mc" / "megatron_ce.json").read_text())["ce_source"] == "checkpoint"
    return tmp_path / "mc", thetas


def test_export_reference_format_computes_our_logits(tmp_path):
    """--format reference: the reference formula on the exported tensors equals our own export through
    trust_remote_code; the reference export re-imports to the same theta."""
    cfg = _cfg()
    mc, thetas = _ours_with_random_theta(tmp_path, cfg)
    assert _to_hf("--load-dir", mc, "--save-dir", tmp_path / "ours_back") == 0
    assert _to_hf("--load-dir", mc, "--save-dir", tmp_path / "ref_back", "--format", "reference") == 0

    ids = token_ids(vocab=cfg.vocab_size)
    want = _logits(_load_ours(tmp_path / "ours_back"), ids)
    got = _logits(reference_model(tmp_path / "ref_back"), ids)
    assert _rel(got, want) <= TOL, _rel(got, want)

    conf = json.loads((tmp_path / "ref_back" / "config.json").read_text())
    assert conf["model_type"] == "olmoe" and conf["architectures"] == ["OlmoeForCausalLM"] and conf["n_ce"] == N_CE
    assert not {"auto_map", "moe_ce_num_compressed", "moe_ce_variant"} & set(conf)
    sd = load_safetensors_dir(str(tmp_path / "ref_back"))
    assert not [k for k in sd if ".mlp.ce." in k]
    for l in range(cfg.num_hidden_layers):
        ces = sd[f"model.layers.{l}.mlp.ces"]
        assert ces.shape == (cfg.num_experts, 3, cfg.hidden_size)
        assert torch.all(ces[:, 1, cfg.intermediate_size:] == 1)  # padding beyond ffn

    # the reference export is importable again, to the same theta tables
    assert _to_mc("--load-dir", tmp_path / "ref_back", "--save-dir", tmp_path / "mc2") == 0
    assert _to_hf("--load-dir", tmp_path / "mc2", "--save-dir", tmp_path / "again") == 0
    again = load_safetensors_dir(str(tmp_path / "again"))
    for name, t in thetas.items():
        assert torch.equal(again[name], t), name
    # a reference export adds no family to the registry (it is a format of the OLMoE family)
    from megatron_ce.convert import supported_model_types

    assert not [t for t in supported_model_types() if "reference" in t]


def _refused(capsys, mc, out, match):
    capsys.readouterr()  # drop earlier output (save_pretrained's progress bar)
    rc = _to_hf("--load-dir", mc, "--save-dir", out, "--format", "reference")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, (rc, err)
    assert not out.exists() or not any(out.iterdir())


def test_export_reference_format_refusals(tmp_path, capsys):
    """One-line errors (exit 2) where the reference layout cannot hold the model's CE."""
    src = tmp_path / "hf"
    make_hf_model(_cfg()).save_pretrained(src)
    assert _to_mc("--load-dir", src, "--save-dir", tmp_path / "plain") == 0
    _refused(capsys, tmp_path / "plain", tmp_path / "o1", "no compressed experts")
    assert _to_mc("--load-dir", src, "--save-dir", tmp_path / "hidden", "--moe-ce-num-compressed", "1",
                  "--moe-ce-variant", "hidden") == 0
    _refused(capsys, tmp_path / "hidden", tmp_path / "o2", "variant hidden")
    wide = tmp_path / "wide"
    make_hf_model(tiny_olmoe_config(num_experts_per_tok=3)).save_pretrained(wide)  # ffn 48 > d 32
    assert _to_mc("--load-dir", wide, "--save-dir", tmp_path / "wide_mc", "--moe-ce-num-compressed", "1") == 0
    _refused(capsys, tmp_path / "wide_mc", tmp_path / "o3", "ffn=48")


def test_export_reference_format_refuses_phimoe(tmp_path, capsys):
    """The reference code is OLMoE-only: any Phi-MoE export is refused (even with ffn <= d)."""
    from tests.models.families import make_hf_model as make_phimoe, tiny_phimoe_config

    src = tmp_path / "phi"
    make_phimoe(tiny_phimoe_config(intermediate_size=24)).save_pretrained(src)
    assert _to_mc("--load-dir", src, "--save-dir", tmp_path / "mc", "--moe-ce-num-compressed", "1") == 0
    _refused(capsys, tmp_path / "mc", tmp_path / "o", "phimoe")
