"""Throughput flags (issue 12 item 7, trainer part): validation and fusion resolution, on CPU.

Megatron-LM's fusions are on by default where their kernel exists; a missing kernel turns the fusion
off with one printed note instead of a megatron-core error at build or run time (on CPU: all off,
exactly today's configuration).
"""

import pytest
import torch

from megatron_ce.training import model as model_mod
from megatron_ce.training.args import ArgError, parse_args
from tests.training.conftest import TINY

BASE = TINY + ["--train-iters", "2"]
ALL_OFF = dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
               apply_rope_fusion=False, gradient_accumulation_fusion=False, moe_permute_fusion=False,
               cross_entropy_loss_fusion=False)


@pytest.mark.parametrize("flags,msg", [
    (["--overlap-param-gather", "--overlap-grad-reduce"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "--overlap-param-gather needs --overlap-grad-reduce"),
    (["--ddp-bucket-size", "0"], "--ddp-bucket-size=0 must be >= 1"),
    (["--moe-ce-lr-mult", "0"], "--moe-ce-lr-mult=0.0 must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay=-0.1 must be >= 0"),
])
def test_bad_flags(flags, msg):
    with pytest.raises(ArgError) as e:
        parse_args(BASE + flags, world_size=2)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("flag", ["--moe-permute-fusion", "--cross-entropy-loss-fusion"])
def test_opt_in_fusions_need_a_gpu(flag):
    with pytest.raises(ArgError, match=f"^{flag} needs a GPU"):
        parse_args(BASE + [flag], world_size=1)


def test_defaults():
    a = parse_args(BASE + ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"],
                   world_size=2)
    assert a.overlap_grad_reduce and a.overlap_param_gather and a.moe_ce_lr_mult == 1.0
    assert (a.bias_swiglu_fusion, a.bias_dropout_fusion, a.masked_softmax_fusion, a.apply_rope_fusion,
            a.gradient_accumulation_fusion) == (True,) * 5  # on by default, like Megatron-LM
    a = parse_args(BASE + ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
                           "--no-rope-fusion", "--no-gradient-accumulation-fusion"], world_size=1)
    assert not any((a.bias_swiglu_fusion, a.bias_dropout_fusion, a.masked_softmax_fusion, a.apply_rope_fusion,
                    a.gradient_accumulation_fusion))


def test_cpu_resolves_to_todays_config():
    kw, note = model_mod.resolve_fusions(parse_args(BASE, world_size=1), swiglu=True, cuda=False)
    assert kw == ALL_OFF
    assert note == ("fusions off (kernel not available): bias-swiglu, bias-dropout, masked-softmax, rope, "
                    "gradient-accumulation (no GPU)")


@pytest.fixture
def kernels(monkeypatch):
    """Pretend to be on a GPU machine whose kernels are the given set."""
    from megatron.core.models.common.embeddings import rope_utils

    def have(names):
        monkeypatch.setattr(model_mod, "module_available", lambda m: m in names)
        monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", object() if "te" in names else None)
    return have


def test_gpu_with_every_kernel(kernels):
    kernels({"te", "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
             "fused_weight_gradient_mlp_cuda"})
    kw, note = model_mod.resolve_fusions(parse_args(BASE, world_size=1), swiglu=True, cuda=True)
    assert note is None and kw == dict(ALL_OFF, bias_activation_fusion=True, bias_dropout_fusion=True,
                                       masked_softmax_fusion=True, apply_rope_fusion=True,
                                       gradient_accumulation_fusion=True)
    # --no-...: off, without a note (asked for, not missing).
    kw, note = model_mod.resolve_fusions(parse_args(BASE + ["--no-rope-fusion"], world_size=1), swiglu=True, cuda=True)
    assert note is None and kw["apply_rope_fusion"] is False and kw["bias_dropout_fusion"] is True


def test_gpu_without_apex_or_te(kernels):
    kernels(set())
    kw, note = model_mod.resolve_fusions(parse_args(BASE, world_size=1), swiglu=False, cuda=True)
    assert kw == dict(ALL_OFF, bias_dropout_fusion=True)  # plain torch fusion: always there on a GPU
    assert note == ("fusions off (kernel not available): bias-swiglu (not a SwiGLU model); masked-softmax "
                    "(no scaled_masked_softmax_cuda kernels); rope (needs Transformer Engine); "
                    "gradient-accumulation (no fused_weight_gradient_mlp_cuda (apex))")
    assert "\n" not in note
