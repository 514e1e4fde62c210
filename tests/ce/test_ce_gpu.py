"""CE on GPU back-ends (TEGroupedMLP, grouped_gemm GroupedMLP): same output and theta grads as the
SequentialMLP CE layer with the same weights. Runs only where CUDA (and TE / grouped_gemm) exist."""

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
