"""Phi-MoE presets (standard library only: launch/plan.py reads them without torch).

The released config is embedded so the paper tools need no download: values from the HF config.json
of microsoft/Phi-3.5-MoE-instruct (docs/METHOD.md §2, §3); its LongRoPE factors are not needed for
counting or benchmarking and are left out."""

from megatron_ce.models.registry import Presets

MODEL_TYPE = "phimoe"  # the HF model_type this family reads

PHI_35_MOE = dict(
    model_type="phimoe",
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=6400,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,  # LongRoPE factors omitted (no parameters)
    tie_word_embeddings=False,
    attention_bias=True,
    lm_head_bias=True,
    router_jitter_noise=0.01,
    input_jitter_noise=0.01,
    router_aux_loss_coef=0.0,
    output_router_logits=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=32000,
)

PRESETS = Presets(
    paper_hf_config=PHI_35_MOE,
    launch=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                num_local_experts=16, num_experts_per_tok=2, intermediate_size=6400, vocab_size=32064,
                head_dim=128, attention_bias=True, lm_head_bias=True, tie_word_embeddings=False,
                qk_norm=False),
    bench_shape=dict(d=4096, ffn=6400, n=16, k=2),
    smoke_shape=dict(d=64, ffn=96, n=4, k=2),
    experts_field="num_local_experts",
    paper_figures=dict(topk=2, k_a=1, active_base=7.45e9, active_ce=4.93e9, reduction_pct=33.8, non_moe=2.4e9,
                       latency_s=(5.59, 4.01, 4.35)),
)
