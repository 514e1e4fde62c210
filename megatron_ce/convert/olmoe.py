"""OLMoE conversion table: HF `OlmoeForCausalLM` <-> megatron-core GPTModel (megatron_ce.models.olmoe).

mcore names are those of the TP=PP=EP=1 state dict; `{layer}` and `{expert}` are expanded.
"""

from __future__ import annotations

from megatron_ce.convert.families import CETables, Family, register
from megatron_ce.convert.hf_io import FusedExperts
from megatron_ce.convert.mapping import QKV, Context, Direct, GatedMLP, Router, Sliced

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
# Reference implementation (HF OLMoE + `OlmoeSparseCompressedMoeBlock`): one tensor `ces` [n, 3, d]
# per layer holding theta_gate, theta_up and theta_down (the latter sliced to [:ffn]).
REFERENCE_CES = H + "mlp.ces"


def reference_import():
    def down(t, ctx: Context):
        if ctx.moe_ffn_hidden_size > t.shape[-1]:
            raise ValueError(
                f"reference ces has width {t.shape[-1]} < ffn {ctx.moe_ffn_hidden_size}: cannot hold theta_down"
            )
        return t[:, 2, : ctx.moe_ffn_hidden_size]

    return [
        Sliced(
            REFERENCE_CES,
            {
                "gate": (CE_MEGATRON["ia3"]["gate"], lambda t, ctx: t[:, 0]),
                "up": (CE_MEGATRON["ia3"]["up"], lambda t, ctx: t[:, 1]),
                "down": (CE_MEGATRON["ia3"]["down"], down),
            },
            hf_shape=lambda mc, ctx: (ctx.num_experts, 3, ctx.hidden_size),
        )
    ]


def build_model(hf_config, moe_ce_num_compressed=0, moe_ce_variant="ia3", **overrides):
    from megatron_ce.models.olmoe import build_olmoe_model

    return build_olmoe_model(
        hf_config,
        moe_ce_num_compressed=moe_ce_num_compressed,
        moe_ce_variant=moe_ce_variant,
        **overrides,
    )


OLMOE = register(
    Family(
        model_type="olmoe",
        architectures=("OlmoeForCausalLM",),
        build_model=build_model,
        table=table,
        ce=CETables(CE_MEGATRON, CE_HF, reference=reference_import, reference_probe=REFERENCE_CES.format(layer=0)),
        # transformers 5.x in-memory layout, should it be found on disk.
        fused_experts=(
            FusedExperts(
                r"(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj",
                [("{0}.{expert}.gate_proj.weight", 0, 2), ("{0}.{expert}.up_proj.weight", 1, 2)],
            ),
            FusedExperts(r"(model\.layers\.\d+\.mlp\.experts)\.down_proj", [("{0}.{expert}.down_proj.weight", 0, 1)]),
        ),
        hf_ignore=(r".*\.rotary_emb\.inv_freq",),
    )
)
