"""OLMoE conversion table: HF `OlmoeForCausalLM` <-> megatron-core GPTModel (`model.py`), and the
names of its CE tables in our export and in the reference implementation's `ces` tensor.

mcore names are those of the TP=PP=EP=1 state dict; `{layer}` and `{expert}` are expanded.
"""

from __future__ import annotations

import torch

from megatron_ce.convert.hf_io import FusedExperts
from megatron_ce.convert.mapping import QKV, Context, Direct, GatedMLP, Mapping, Router
from megatron_ce.models.registry import CETables

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
E = "mlp.experts.local_experts.{expert}."
HE = "mlp.experts.{expert}."


def table(config):
    return [
        Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Direct(L + "input_layernorm.weight", H + "input_layernorm.weight"),
        QKV(
            L + "self_attention.linear_qkv.weight",
            q=H + "self_attn.q_proj.weight",
            k=H + "self_attn.k_proj.weight",
            v=H + "self_attn.v_proj.weight",
        ),
        Direct(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
        Direct(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
        Direct(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        Router(L + "mlp.router.weight", H + "mlp.gate.weight"),
        GatedMLP(L + E + "linear_fc1.weight", gate=H + HE + "gate_proj.weight", up=H + HE + "up_proj.weight"),
        Direct(L + E + "linear_fc2.weight", H + HE + "down_proj.weight"),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
        Direct("output_layer.weight", "lm_head.weight"),
    ]


CE_MEGATRON = {
    "ia3": {"gate": L + "mlp.ce.gate", "up": L + "mlp.ce.up", "down": L + "mlp.ce.down"},
    "hidden": {"hidden": L + "mlp.ce.hidden"},
}
# Names of the CE tables in our HF export (the HF CE modeling code must use the same module path).
CE_HF = {
    "ia3": {"gate": H + "mlp.ce.gate", "up": H + "mlp.ce.up", "down": H + "mlp.ce.down"},
    "hidden": {"hidden": H + "mlp.ce.hidden"},
}
# Reference implementation (HF OLMoE + `OlmoeSparseCompressedMoeBlock`): one tensor `ces` [n, 3, d] per
# layer. Its `OlmoeCEMLP.forward(x, e1, e2, e3)` computes down_proj((act(gate_proj(x*e1)) * up_proj(x*e3)) * e2)
# with e1 = ces[:, 0], e2 = ces[:, 1, :ffn], e3 = ces[:, 2]: the slots are gate, down, up (not the order
# of mention; docs/METHOD.md).
REFERENCE_CES = H + "mlp.ces"
REFERENCE_SLOTS = {"gate": 0, "down": 1, "up": 2}


class ReferenceCES(Mapping):
    """The reference `ces` [n, 3, d] <-> our ia3 tables gate [n, d], up [n, d], down [n, ffn].

    theta_down fills the first ffn entries of its slot (the reference slices `[:ffn]`); the export pads
    the rest with ones, the value the reference initialises them to."""

    def __init__(self):
        self.megatron = dict(CE_MEGATRON["ia3"])
        self.hf = {"ces": REFERENCE_CES}

    @staticmethod
    def _check(ctx: Context):
        if ctx.moe_ffn_hidden_size > ctx.hidden_size:
            raise ValueError(
                f"the reference `ces` [n, 3, hidden={ctx.hidden_size}] cannot hold theta_down of size "
                f"ffn={ctx.moe_ffn_hidden_size} (the reference code needs ffn <= hidden)"
            )

    def to_megatron(self, hf, ctx):
        self._check(ctx)
        ces, ffn = hf["ces"], ctx.moe_ffn_hidden_size
        out = {r: ces[:, s] for r, s in REFERENCE_SLOTS.items()}
        out["down"] = out["down"][:, :ffn]
        return {r: t.contiguous().clone() for r, t in out.items()}

    def to_hf(self, mc, ctx):
        self._check(ctx)
        down = mc["down"]
        n, ffn = down.shape
        padded = torch.ones(n, ctx.hidden_size, dtype=down.dtype)
        padded[:, :ffn] = down
        slots = dict(mc, down=padded)
        ces = torch.stack([slots[r] for r in sorted(REFERENCE_SLOTS, key=REFERENCE_SLOTS.get)], dim=1)
        return {"ces": ces.to(mc["gate"].dtype)}  # the dtype the engine planned the tensor with

    def hf_shapes(self, mc_shapes, ctx):
        return {"ces": (mc_shapes["gate"][0], len(REFERENCE_SLOTS), ctx.hidden_size)}

    def __repr__(self):
        return f"ReferenceCES({self.hf['ces']!r})"


def reference_ces():
    """The mappings of the reference CE format (both directions)."""
    return [ReferenceCES()]


CE_TABLES = CETables(CE_MEGATRON, CE_HF, reference=reference_ces, reference_probe=REFERENCE_CES.format(layer=0))
# transformers 5.x in-memory layout, should it be found on disk.
FUSED_EXPERTS = (
    FusedExperts(
        r"(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj",
        [("{0}.{expert}.gate_proj.weight", 0, 2), ("{0}.{expert}.up_proj.weight", 1, 2)],
    ),
    FusedExperts(r"(model\.layers\.\d+\.mlp\.experts)\.down_proj", [("{0}.{expert}.down_proj.weight", 0, 1)]),
)
HF_IGNORE = (r".*\.rotary_emb\.inv_freq",)
