"""Phi-MoE conversion table: HF `PhimoeForCausalLM` <-> megatron-core PhimoeGPTModel (`model.py`),
and the names of its CE tables in our export.

HF names are the transformers 4.x names every Phi-MoE checkpoint on disk uses (transformers 5.x
`save_pretrained` writes them too): `block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w2/w3`
(w1 = gate, w3 = up, w2 = down). The 5.x in-memory names (`mlp.router`, fused `mlp.experts.gate_up_proj`
[E, 2F, d] / `down_proj` [E, d, F]) are read too, should they be found on disk.
mcore names are those of the TP=PP=EP=1 state dict; `{layer}` and `{expert}` are expanded.
Biases (q/k/v/o with `attention_bias`, lm_head with `lm_head_bias`, every LayerNorm) follow the config.
"""

from __future__ import annotations

from megatron_ce.convert.hf_io import FusedExperts
from megatron_ce.convert.mapping import QKV, Direct, GatedMLP, Router
from megatron_ce.models.registry import CETables

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
E = "mlp.experts.local_experts.{expert}."
HE = "block_sparse_moe.experts.{expert}."


def table(config):
    attn_bias = bool(config.add_qkv_bias)
    lm_head_bias = bool(getattr(config, "phimoe_lm_head_bias", False))
    qkv = lambda p: QKV(  # noqa: E731
        L + "self_attention.linear_qkv." + p,
        q=H + "self_attn.q_proj." + p,
        k=H + "self_attn.k_proj." + p,
        v=H + "self_attn.v_proj." + p,
    )
    out = [Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for p in ("weight", "bias"):
        out.append(Direct(L + "input_layernorm." + p, H + "input_layernorm." + p))
    out.append(qkv("weight"))
    if attn_bias:
        out.append(qkv("bias"))
    out.append(Direct(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"))
    if attn_bias:
        out.append(Direct(L + "self_attention.linear_proj.bias", H + "self_attn.o_proj.bias"))
    for p in ("weight", "bias"):
        out.append(Direct(L + "pre_mlp_layernorm." + p, H + "post_attention_layernorm." + p))
    out += [
        Router(L + "mlp.router.weight", H + "block_sparse_moe.gate.weight"),
        GatedMLP(L + E + "linear_fc1.weight", gate=H + HE + "w1.weight", up=H + HE + "w3.weight"),
        Direct(L + E + "linear_fc2.weight", H + HE + "w2.weight"),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
        Direct("decoder.final_layernorm.bias", "model.norm.bias"),
        Direct("output_layer.weight", "lm_head.weight"),
    ]
    if lm_head_bias:
        out.append(Direct("output_layer.bias", "lm_head.bias"))
    return out


CE_MEGATRON = {
    "ia3": {"gate": L + "mlp.ce.gate", "up": L + "mlp.ce.up", "down": L + "mlp.ce.down"},
    "hidden": {"hidden": L + "mlp.ce.hidden"},
}
# Names of the CE tables in our HF export (the HF CE modeling code must use the same module path).
CE_HF = {
    "ia3": {
        "gate": H + "block_sparse_moe.ce.gate",
        "up": H + "block_sparse_moe.ce.up",
        "down": H + "block_sparse_moe.ce.down",
    },
    "hidden": {"hidden": H + "block_sparse_moe.ce.hidden"},
}


# The reference CE code is OLMoE-only (and its `ces` [n, 3, d] cannot hold Phi's ffn 6400 > d).
CE_TABLES = CETables(CE_MEGATRON, CE_HF)
_LAYER = r"(model\.layers\.\d+)"
# transformers 5.x in-memory names, should they be found on disk: renamed to the 4.x block,
# then the fused expert tensors are split per expert (gate_up_proj = [w1; w3]).
HF_ALIASES = (
    (_LAYER + r"\.mlp\.router\.weight$", r"\1.block_sparse_moe.gate.weight"),
    (_LAYER + r"\.mlp\.experts\.(gate_up_proj|down_proj)$", r"\1.block_sparse_moe.experts.\2"),
)
FUSED_EXPERTS = (
    FusedExperts(
        _LAYER + r"\.block_sparse_moe\.experts\.gate_up_proj",
        [
            ("{0}.block_sparse_moe.experts.{expert}.w1.weight", 0, 2),
            ("{0}.block_sparse_moe.experts.{expert}.w3.weight", 1, 2),
        ],
    ),
    FusedExperts(
        _LAYER + r"\.block_sparse_moe\.experts\.down_proj",
        [("{0}.block_sparse_moe.experts.{expert}.w2.weight", 0, 1)],
    ),
)
HF_IGNORE = (r".*\.rotary_emb\.(inv_freq|original_inv_freq|long_inv_freq)",)
