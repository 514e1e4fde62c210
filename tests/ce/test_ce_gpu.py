"""CE on GPU back-ends (TEGroupedMLP, grouped_gemm GroupedMLP): same output and theta grads as the
SequentialMLP CE layer with the same weights; the TE experts' fc1 grouped GEMMs on weight views against
the per-expert torch.mm path (every gradient); the fusions validate_ce lets through against their
unfused runs; --gradient-accumulation-fusion under megatron-core DDP. Runs only where CUDA (and TE /
grouped_gemm) exist."""

import pytest
import torch

from tests.ce.layer_utils import build_moe, ce_config, expert_weights, randomize

pytestmark = pytest.mark.gpu


def _te_ce_layer(cfg):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ce.ce import get_gpt_ce_layer_te_spec

    spec = get_gpt_ce_layer_te_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=True)
    return build_module(spec.submodules.mlp, config=cfg)


def _run(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_out)
    return out.detach().float(), {n: p.grad.float() for n, p in layer.named_parameters() if n.startswith("ce.")}


@pytest.mark.parametrize("variant", ["ia3", "hidden"])
@pytest.mark.parametrize("backend", ["te", "grouped_gemm"])
def test_gpu_grouped_backends_match_sequential(mcore_world1, variant, backend):
    if backend == "te":
        pytest.importorskip("transformer_engine")
    else:
        pytest.importorskip("grouped_gemm")
    cfg = ce_config(n=8, k=4, k_a=2, variant=variant, bf16=True, params_dtype=torch.bfloat16,
                    use_cpu_initialization=False)
    seq = build_moe(cfg, grouped=False).cuda()
    randomize(seq, seed=7)
    other = (_te_ce_layer(cfg) if backend == "te" else build_moe(cfg, grouped=True)).cuda()
    w_gate, w_up, w_down = expert_weights(seq)
    with torch.no_grad():
        other.router.weight.copy_(seq.router.weight)
        for name, p in other.ce.named_parameters():
            p.copy_(getattr(seq.ce, name))
        if backend == "te":
            for e in range(8):
                getattr(other.experts.linear_fc1, f"weight{e}").copy_(torch.cat([w_gate[e], w_up[e]]))
                getattr(other.experts.linear_fc2, f"weight{e}").copy_(w_down[e])
        else:
            d = cfg.hidden_size
            other.experts.weight1.view(8, d, -1).copy_(torch.cat([w_gate, w_up], 1).transpose(1, 2))
            other.experts.weight2.view(8, -1, d).copy_(w_down.transpose(1, 2))
    x = torch.randn(16, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = 0.1 * torch.randn_like(x)
    out_s, g_s = _run(seq, x, grad_out)
    out_o, g_o = _run(other, x, grad_out)
    tol = 2e-2 * out_s.abs().max().item()  # bf16: different GEMM kernels round differently
    assert (out_s - out_o).abs().max().item() <= tol
    for name in g_s:
        assert (g_s[name] - g_o[name]).abs().max().item() <= 2e-2 * g_s[name].abs().max().item(), name


# ----------------------------------------------------------------------------------------------
# TE experts: every gradient, the fusions that stay valid with CE
# ----------------------------------------------------------------------------------------------


def _gpu_cfg(**kw):
    base = dict(n=8, k=4, k_a=2, bf16=True, params_dtype=torch.bfloat16, use_cpu_initialization=False)
    base.update(kw)
    return ce_config(**base)


def _copy_into_te(seq, te_layer, n=8):
    """The sequential layer's weights into a TE layer (fused fc1 [gate; up] per expert)."""
    w_gate, w_up, w_down = expert_weights(seq)
    with torch.no_grad():
        te_layer.router.weight.copy_(seq.router.weight)
        for name, p in te_layer.ce.named_parameters():
            p.copy_(getattr(seq.ce, name))
        for e in range(n):
            getattr(te_layer.experts.linear_fc1, f"weight{e}").copy_(torch.cat([w_gate[e], w_up[e]]))
            getattr(te_layer.experts.linear_fc2, f"weight{e}").copy_(w_down[e])


def _run_all(layer, x, grad_out):
    """Output, input grad and every parameter grad, expert weights keyed by (fc, expert)."""
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    out.backward(grad_out)
    grads = {}
    for name, p in layer.named_parameters():
        g = p.grad
        if g is None:
            continue
        parts = name.split(".")
        if name.startswith("experts.local_experts."):  # experts.local_experts.{e}.linear_fcX.weight
            grads[(parts[3], int(parts[2]))] = g.float()
        elif name.startswith("experts.linear_fc"):  # experts.linear_fcX.weight{e}
            grads[(parts[1], int(parts[2][len("weight"):]))] = g.float()
        else:
            grads[name] = g.float()
    return out.detach().float(), x.grad.float(), grads


def _close(a, b, what):
    tol = 2e-2 * max(b.abs().max().item(), 1e-6)  # bf16: different GEMM kernels round differently
    assert (a - b).abs().max().item() <= tol, what


def _assert_same(got, want):
    _close(got[0], want[0], "output")
    _close(got[1], want[1], "input grad")
    assert set(got[2]) == set(want[2])
    for key, g in want[2].items():
        _close(got[2][key], g, key)


@pytest.mark.parametrize("swiglu_fusion", [False, True])
def test_te_experts_match_sequential_all_grads(mcore_world1, monkeypatch, swiglu_fusion):
    """CETEGroupedMLP (TE grouped GEMMs on views of the fc1 weights) against CESequentialMLP forced onto
    the per-expert torch.mm path: outputs, input, router, theta and every expert weight gradient."""
    pytest.importorskip("transformer_engine")
    from megatron_ce.ce import experts

    cfg = _gpu_cfg(bias_activation_fusion=swiglu_fusion)
    seq = build_moe(cfg, grouped=False).cuda()
    randomize(seq, seed=7)
    te_layer = _te_ce_layer(cfg).cuda()
    _copy_into_te(seq, te_layer)
    x = torch.randn(32, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = 0.1 * torch.randn_like(x)
    with monkeypatch.context() as m:
        m.setattr(experts._TEGEMM, "usable", staticmethod(lambda *a: False))
        want = _run_all(seq, x, grad_out)
    assert experts._TEGEMM.usable(x, [te_layer.experts.linear_fc1.weight0], True), "TE GEMM path not taken"
    _assert_same(_run_all(te_layer, x, grad_out), want)


@pytest.mark.parametrize("flag", ["moe_permute_fusion", "moe_router_fusion"])
def test_valid_fusions_match_unfused(mcore_world1, flag):
    """Fusions validate_ce lets through give the unfused numbers with CE (ia3, fixed split: the fused
    permute also carries the 2*k_a payload columns)."""
    pytest.importorskip("transformer_engine")
    from megatron.core.transformer.moe import moe_utils

    if flag == "moe_router_fusion" and getattr(moe_utils, "fused_topk_with_score_function", None) is None:
        pytest.skip("this TE has no fused top-k router")
    base = dict(dispatcher="alltoall")
    try:
        cfg_on = _gpu_cfg(**base, **{flag: True})
    except (ValueError, AssertionError) as e:  # this TE lacks the fused kernels
        pytest.skip(str(e))
    cfg_off = _gpu_cfg(**base)
    off = _te_ce_layer(cfg_off).cuda()
    randomize(off, seed=11)
    on = _te_ce_layer(cfg_on).cuda()
    on.load_state_dict(off.state_dict())
    x = torch.randn(32, 2, cfg_off.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad_out = 0.1 * torch.randn_like(x)
    _assert_same(_run_all(on, x, grad_out), _run_all(off, x, grad_out))


def test_gradient_accumulation_fusion_fills_main_grad(mcore_world1):
    """Under megatron-core DDP with --gradient-accumulation-fusion, TE's fc2 writes main_grad itself and
    the CE fc1 gradients (returned through autograd) are added by DDP's hook: every main_grad equals
    the unfused run's, over two accumulated micro-batches."""
    pytest.importorskip("transformer_engine")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    def run(fuse):
        cfg = _gpu_cfg(dispatcher="alltoall", gradient_accumulation_fusion=fuse)
        layer = _te_ce_layer(cfg).cuda()
        randomize(layer, seed=5)
        ddp = DistributedDataParallel(
            cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True), layer)
        ddp.zero_grad_buffer()
        g = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(2):
            x = torch.randn(32, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
            out, _ = ddp(x)
            out.backward(0.1 * torch.ones_like(out))
        ddp.finish_grad_sync()
        return {n: p.main_grad.float().clone() for n, p in layer.named_parameters()}

    fused, plain = run(True), run(False)
    assert set(fused) == set(plain)
    for name, g in plain.items():
        assert g.abs().max() > 0, f"{name}: no gradient in the unfused run"
        _close(fused[name], g, name)
