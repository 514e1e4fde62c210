"""megatron-core fusions and expert options with CE (megatron_ce/ce/config.py validate_ia3_expert_options).

- The bias-SwiGLU fusion (config.bias_activation_fusion; Megatron turns it off with
  --no-bias-swiglu-fusion) is honoured by the ia3 CE experts: same outputs
  and gradients as the plain-torch reference, with fewer activations kept for the backward pass.
- Options that live inside megatron-core's expert forward, which the ia3 experts replace, are refused
  with one line naming the flag; the "hidden" variant (experts unchanged) accepts them.
- Fusions that stay valid with CE pass validation.
"""

import pytest
import torch

from megatron_ce.ce import ConfigError
from megatron_ce.ce.config import validate_ce
from tests.ce.layer_utils import build_moe, ce_config, randomize
from tests.ce.reference import reference_ce_moe
from tests.ce.test_ce_layer import TOL, _expert_grads, max_diff, reference_leaves, run_layer


def _saved_numel(layer, x):
    """Elements autograd keeps for the backward pass of one forward (weights included)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.clone().requires_grad_(True))
    return total


def _pair(grouped=False, **kw):
    """The same randomised CE layer with and without the bias-SwiGLU fusion."""
    fused = build_moe(ce_config(n=8, k=4, k_a=2, bias_activation_fusion=True, **kw), grouped)
    plain = build_moe(ce_config(n=8, k=4, k_a=2, bias_activation_fusion=False, **kw), grouped)
    randomize(fused, seed=3)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


# ia3: the fused activation scales by c_d * p ([rows, F]); hidden on the legacy grouped experts in fp32
# (their parent forward needs bf16, so the CE path runs without scales): by p alone ([rows, 1]).
@pytest.mark.parametrize("variant,grouped", [("ia3", False), ("ia3", True), ("hidden", True)])
def test_bias_swiglu_fusion_matches_reference(mcore_world1, variant, grouped):
    fused, _ = _pair(grouped, moe_ce_variant=variant)
    x = torch.randn(6, 3, 32)
    grad_out = 0.1 * torch.randn(6, 3, 32)
    out, x_grad, grads = run_layer(fused, x, grad_out)

    router, w_gate, w_up, w_down, thetas = reference_leaves(fused)
    xr = x.reshape(-1, 32).double().requires_grad_(True)
    ref = reference_ce_moe(xr, router, w_gate, w_up, w_down, thetas, 4, 2, variant=variant)
    ref.backward(grad_out.reshape(-1, 32).double())
    assert max_diff(out.reshape(-1, 32), ref) <= TOL
    assert max_diff(x_grad.reshape(-1, 32), xr.grad) <= TOL
    assert max_diff(grads["router.weight"], router.grad) <= TOL
    for got, want in zip(_expert_grads(fused), (w_gate, w_up, w_down)):
        assert max_diff(got, want.grad) <= TOL
    for name, ref_theta in thetas.items():
        assert max_diff(grads[f"ce.{name}"], ref_theta.grad) <= TOL, name


@pytest.mark.parametrize("split", ["fixed", "mass"])
def test_bias_swiglu_fusion_keeps_fewer_activations(mcore_world1, split):
    """The fused activation keeps gate, up and the scale only; the plain expression also keeps
    silu(gate) and silu(gate) * up, two more [dispatched rows, F] tensors."""
    mass = dict(moe_ce_split="mass", moe_ce_main_mass=0.7, moe_ce_num_compressed=0)
    fused, plain = _pair(**(mass if split == "mass" else {}))
    x = torch.randn(6, 3, 32)
    kept_fused, kept_plain = _saved_numel(fused, x), _saved_numel(plain, x)
    rows = 18 * 2 if split == "fixed" else 18  # dispatched rows: T * k_m (mass: at least one per token)
    assert kept_plain - kept_fused >= 2 * rows * fused.config.moe_ffn_hidden_size, (kept_fused, kept_plain)
    # the same numbers either way (the fixed split is also checked against the reference above)
    grad_out = 0.1 * torch.randn(6, 3, 32)
    got, want = run_layer(fused, x, grad_out), run_layer(plain, x, grad_out)
    assert max_diff(got[0], want[0]) <= TOL and max_diff(got[1], want[1]) <= TOL
    for name, g in want[2].items():
        assert max_diff(got[2][name], g) <= TOL, name


def _good(**kw):
    return ce_config(n=8, k=4, k_a=2, **kw)


def _with(cfg, **fields):
    """A copy of a validated config with fields changed (megatron-core's own checks skipped: several
    of these options need CUDA / Transformer Engine to construct)."""
    new = object.__new__(type(cfg))
    new.__dict__.update(cfg.__dict__)
    new.__dict__.update(fields)
    return new


REFUSED = [
    (dict(fp8="e4m3"), "--fp8-format"),
    (dict(fp4="e2m1"), "--fp4-format"),
    (dict(use_te_activation_func=True), "--use-te-activation-func"),
    (dict(activation_func_clamp_value=7.0), "--activation-func-clamp-value"),
    (dict(glu_linear_offset=1.0), "--glu-linear-offset"),
    (dict(activation_func_fp8_input_store=True), "--activation-func-fp8-input-store"),
    (dict(recompute_granularity="selective", recompute_modules=["moe_act"]), "--recompute-modules moe_act"),
    (dict(fine_grained_activation_offloading=True, offload_modules=["expert_fc1"]),
     "--offload-modules expert_fc1"),
    (dict(fine_grained_activation_offloading=True, offload_modules=["moe_act"]), "--offload-modules moe_act"),
    (dict(delay_wgrad_compute=True), "--delay-wgrad-compute"),
]


@pytest.mark.parametrize("fields,flag", REFUSED, ids=[f for _, f in REFUSED])
def test_ia3_refuses_options_its_experts_would_skip(fields, flag):
    cfg = _with(_good(), **fields)
    with pytest.raises(ConfigError) as err:
        validate_ce(cfg)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{flag} is not supported with --moe-ce-variant=ia3"), text
    validate_ce(_with(_good(moe_ce_variant="hidden"), **fields))  # the hidden variant runs mcore's experts
    validate_ce(_with(_good(moe_ce_num_compressed=0), **fields))  # CE off: nothing to refuse


VALID = [
    dict(moe_permute_fusion=True),
    dict(moe_router_fusion=True),
    dict(bias_activation_fusion=True),
    dict(gradient_accumulation_fusion=True),
    dict(moe_grouped_gemm=True),
    dict(recompute_granularity="selective", recompute_modules=["moe"]),
]


@pytest.mark.parametrize("fields", VALID, ids=[next(iter(f)) for f in VALID])
def test_fusions_valid_with_ce_pass(fields):
    validate_ce(_with(_good(), **fields))


def test_ddp_main_grad_gets_every_ce_gradient(mcore_world1):
    """What --gradient-accumulation-fusion and --overlap-grad-reduce rely on: under megatron-core DDP
    every parameter of a CE layer (the fc1 weights fed by the CE GEMMs included, experts without
    tokens too) hands DDP a gradient, and main_grad ends up as the sum over micro-batches of the
    plain autograd gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = ce_config(n=8, k=4, k_a=2)
    layer, plain = build_moe(cfg), build_moe(ce_config(n=8, k=4, k_a=2))
    randomize(layer, seed=9)
    plain.load_state_dict(layer.state_dict())
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True), layer)
    ddp.zero_grad_buffer()
    xs = [torch.randn(2, 1, 32) for _ in range(2)]  # 2 tokens x 2 main experts: most experts get none
    for x in xs:
        out, _ = ddp(x)
        out.backward(torch.ones_like(out))
        out, _ = plain(x)
        out.backward(torch.ones_like(out))
    ddp.finish_grad_sync()
    for (name, p), q in zip(layer.named_parameters(), plain.parameters()):
        assert q.grad is not None, name
        assert max_diff(p.main_grad, q.grad) <= TOL, name
