"""Bad configurations fail at construction with one line naming the flag and the rule."""

import pytest
import torch.nn.functional as F

from megatron_ce.ce import CETransformerConfig, ConfigError

GOOD = dict(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_moe_experts=8,
    moe_router_topk=4,
    moe_ffn_hidden_size=48,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    moe_ce_num_compressed=2,
)

CASES = [
    (dict(moe_ce_num_compressed=4), "--moe-ce-num-compressed=4 must be < --moe-router-topk=4"),
    (dict(moe_ce_num_compressed=5), "--moe-ce-num-compressed=5 must be < --moe-router-topk=4"),
    (dict(moe_ce_num_compressed=-1), "--moe-ce-num-compressed=-1 must be >= 0"),
    (dict(moe_ce_variant="ia4"), "--moe-ce-variant='ia4' is unknown; choose one of ia3, hidden"),
    (
        dict(expert_model_parallel_size=3),
        "--num-experts=8 must be divisible by --expert-model-parallel-size=3",
    ),
    (
        dict(tensor_model_parallel_size=3, sequence_parallel=True),
        "--num-attention-heads=4 must be divisible by --tensor-model-parallel-size=3",
    ),
    (
        dict(pipeline_model_parallel_size=3),
        "--num-layers=4 must be divisible by --pipeline-model-parallel-size=3",
    ),
    (
        dict(tensor_model_parallel_size=2),
        "--tensor-model-parallel-size=2 with MoE requires --sequence-parallel",
    ),
    (dict(gated_linear_unit=False), "--moe-ce-variant=ia3 needs SwiGLU experts (--swiglu)"),
    (
        dict(moe_ce_split="mass", moe_ce_num_compressed=0, moe_permute_fusion=True),
        "--moe-permute-fusion is not supported with --moe-ce-split=mass",
    ),
]


@pytest.mark.parametrize("override,message", CASES, ids=[m.split()[0] for _, m in CASES])
def test_bad_config_names_flag(override, message):
    with pytest.raises(ConfigError) as err:
        CETransformerConfig(**{**GOOD, **override})
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_good_config_and_off_switch():
    cfg = CETransformerConfig(**GOOD)
    assert cfg.moe_ce_num_main == 2
    # k_a = 0 switches CE off; any top-k works then, and the hidden variant needs no SwiGLU.
    CETransformerConfig(**{**GOOD, "moe_ce_num_compressed": 0, "moe_router_topk": 2})
    CETransformerConfig(**{**GOOD, "moe_ce_variant": "hidden", "gated_linear_unit": False})


def test_layer_validates_plain_transformer_config(mcore_world1):
    """A plain TransformerConfig carrying CE fields is checked when the CE layer is built."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tests.ce.layer_utils import build_moe

    cfg = TransformerConfig(**{k: v for k, v in GOOD.items() if not k.startswith("moe_ce")})
    cfg.moe_ce_num_compressed = 4
    with pytest.raises(ConfigError, match="--moe-ce-num-compressed=4 must be < --moe-router-topk=4"):
        build_moe(cfg)
