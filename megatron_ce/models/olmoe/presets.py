"""OLMoE presets (standard library only: launch/plan.py reads them without torch).

The released config is embedded so the paper tools need no download: values from the HF config.json
of allenai/OLMoE-1B-7B-0924 (docs/METHOD.md §2, §3)."""

from megatron_ce.models.registry import Presets

MODEL_TYPE = "olmoe"  # the HF model_type this family reads

OLMOE_1B_7B = dict(
    model_type="olmoe",
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    clip_qkv=None,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
    hidden_act="silu",
    initializer_range=0.02,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
)

PRESETS = Presets(
    paper_hf_config=OLMOE_1B_7B,
    launch=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                num_experts=64, num_experts_per_tok=8, intermediate_size=1024, vocab_size=50304, head_dim=128,
                tie_word_embeddings=False,
                qk_norm=True),  # full-width QK norms: their inputs are kept for the backward
    bench_shape=dict(d=2048, ffn=1024, n=64, k=8),
    smoke_shape=dict(d=64, ffn=32, n=8, k=4),
    paper_figures=dict(topk=8, k_a=4, active_base=1.28e9, active_ce=878e6, reduction_pct=31.4, non_moe=None,
                       latency_s=(7.14, 5.31, 5.83)),
)
