"""tools/count_params.py on tiny configs equals a hand count."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OLMOE = dict(
    model_type="olmoe", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)
PHIMOE = dict(
    model_type="phimoe", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=64, original_max_position_embeddings=64, attention_bias=True,
    lm_head_bias=True, tie_word_embeddings=False, rope_scaling=None,
)

# ---- hand counts (d 32, ffn 48, vocab 128, 2 layers, 4 experts) ----
D, F, V, L, E = 32, 48, 128, 2, 4
EXPERT = 3 * D * F  # gate, up, down: 4608
CE_IA3 = 2 * D + F  # 112
CE_HIDDEN = D  # 32

# OLMoE layer: input RMSNorm d, q/k/v/o 4*d*d, full-width q-norm d and k-norm d (4 kv heads * 8),
# pre-MLP RMSNorm d, router E*d
OLMOE_LAYER = D + 4 * D * D + D + D + D + E * D  # 4352
OLMOE_DENSE = L * OLMOE_LAYER + V * D + V * D + D  # + embedding, untied lm_head, final norm = 16928

# Phi-MoE layer: LayerNorm w+b (2d), q d*d+d, k and v d*16+16 (2 kv heads * head_dim 8), o d*d+d,
# post LayerNorm 2d, router E*d (no bias)
KV = 2 * 8
PHI_LAYER = 2 * D + (D * D + D) + 2 * (D * KV + KV) + (D * D + D) + 2 * D + E * D  # 3424
PHI_DENSE = L * PHI_LAYER + V * D + (V * D + V) + 2 * D  # emb, lm_head with bias, final LayerNorm = 15232


def _run(tmp_path, cfg, *flags):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "count_params.py"), "--model", str(path), "--json", *flags],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


@pytest.mark.parametrize("variant,ce_each", [("ia3", CE_IA3), ("hidden", CE_HIDDEN)])
def test_olmoe_hand_count(tmp_path, variant, ce_each):
    r = _run(tmp_path, OLMOE, "--moe-ce-num-compressed", "1", "--moe-ce-variant", variant)
    assert r["dense_params"] == OLMOE_DENSE == 16928
    assert r["router_params"] == L * E * D
    assert r["total_base"] == OLMOE_DENSE + L * E * EXPERT == 53792
    assert r["total_ce"] == r["total_base"] + L * E * ce_each
    assert r["active_base"] == OLMOE_DENSE + L * 2 * EXPERT == 35360  # top-2
    assert r["active_topk_main"] == OLMOE_DENSE + L * 1 * EXPERT
    assert r["active_ce"] == OLMOE_DENSE + L * (EXPERT + ce_each)  # 1 main + 1 compressed
    # paper formula: non-MoE without router, 3*d*ffn per expert, 2d+ffn per compressed expert
    assert r["formula"]["active_ce"] == OLMOE_DENSE - L * E * D + L * (EXPERT + CE_IA3)


def test_olmoe_topk_override(tmp_path):
    r = _run(tmp_path, OLMOE, "--moe-router-topk", "4", "--moe-ce-num-compressed", "2")
    assert r["active_base"] == OLMOE_DENSE + L * 4 * EXPERT
    assert r["active_ce"] == OLMOE_DENSE + L * (2 * EXPERT + 2 * CE_IA3)


def test_phimoe_hand_count(tmp_path):
    r = _run(tmp_path, PHIMOE)  # default k_a = top-k/2 = 1
    assert r["dense_params"] == PHI_DENSE == 15232
    assert r["total_base"] == PHI_DENSE + L * E * EXPERT == 52096
    assert r["active_base"] == PHI_DENSE + L * 2 * EXPERT == 33664
    assert r["active_ce"] == PHI_DENSE + L * (EXPERT + CE_IA3) == 24672
    # the paper's 2.4B approximation of Phi-MoE's non-MoE params is used only for the released size
    assert r["formula"]["non_moe"] == PHI_DENSE - L * E * D
    assert "paper_stated" not in r
