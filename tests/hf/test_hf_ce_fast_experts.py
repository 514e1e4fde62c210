"""The expert computation of the exported HF CE blocks (megatron_ce/hf/ce_common.py, used by every
megatron_ce/hf/modeling_*_ce.py): the sorted,
fused-weight path (ExpertLinear / run_main_experts) against plain per-expert / per-token formulas,
gradients included, in every fused-weight layout transformers uses."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ce.hf import ce_common
from megatron_ce.hf import modeling_olmoe_ce as olmoe_ce
from megatron_ce.hf import modeling_phimoe_ce as phimoe_ce


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_expert_linear_matches_per_row_linear(transposed, interleaved):
    g = torch.Generator().manual_seed(0)
    E, R, K, counts = 4, 6, 5, [3, 0, 4, 2]  # expert 1 gets no rows: its gradient must be 0
    n = sum(counts)
    shape = (E, K, 2 * R) if transposed else (E, 2 * R, K)
    w = torch.randn(shape, generator=g).requires_grad_()
    xa = torch.randn(n, K, generator=g).requires_grad_()
    xb = torch.randn(n, K, generator=g).requires_grad_()
    ga, gb = torch.randn(n, R, generator=g), torch.randn(n, R, generator=g)

    ya, yb = ce_common.ExpertLinear.apply(w, counts, 2, transposed, interleaved, xa, xb)
    ((ya * ga).sum() + (yb * gb).sum()).backward()
    got = [ya, yb, w.grad, xa.grad, xb.grad]
    w.grad = xa.grad = xb.grad = None

    # reference: the [E, 2R, K] weight, gate/up rows split by layout, one F.linear per row
    wd = w.transpose(1, 2) if transposed else w
    w_gate, w_up = (wd[:, 0::2], wd[:, 1::2]) if interleaved else (wd[:, :R], wd[:, R:])
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    ra = torch.stack([F.linear(xa[i], w_gate[expert[i]]) for i in range(n)])
    rb = torch.stack([F.linear(xb[i], w_up[expert[i]]) for i in range(n)])
    ((ra * ga).sum() + (rb * gb).sum()).backward()
    for a, b in zip(got, [ra, rb, w.grad, xa.grad, xb.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[2][1]) == 0


def _olmoe_block(variant):
    cfg = olmoe_ce.OlmoeCEConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, num_experts=6, num_experts_per_tok=4,
                                 moe_ce_num_compressed=2, moe_ce_variant=variant)
    return olmoe_ce.OlmoeCESparseMoeBlock(cfg)


def _phimoe_block(variant):
    cfg = phimoe_ce.PhimoeCEConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_local_experts=6,
                                   num_experts_per_tok=2, moe_ce_num_compressed=1, moe_ce_variant=variant,
                                   input_jitter_noise=0.0)
    return phimoe_ce.PhimoeCESparseMoeBlock(cfg)


def _per_token_reference(block, x):
    """docs/METHOD.md §1 written per token from the block's routing: y = sum_main p_e W_d((silu(W_g(x c_g)) *
    W_u(x c_u)) c_d), c = sum_j w_j theta_j over the compressed experts."""
    main_idx, main_w, aux_idx, aux_w = block.route(x)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    f = down.shape[2]
    ce = block.ce
    rows = []
    for t in range(x.shape[0]):
        def mix(table):
            return sum(aux_w[t, j] * table[aux_idx[t, j]] for j in range(aux_idx.shape[1]))

        if block.variant == "ia3":
            c_g, c_u, c_d = mix(ce.gate), mix(ce.up), mix(ce.down)
        else:
            c_g = c_u = mix(ce.hidden)
            c_d = torch.ones(f)
        y = 0
        for r in range(main_idx.shape[1]):
            e = main_idx[t, r]
            h = F.silu(gate_up[e, :f] @ (x[t] * c_g)) * (gate_up[e, f:] @ (x[t] * c_u))
            y = y + main_w[t, r] * (down[e] @ (h * c_d))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("make", [_olmoe_block, _phimoe_block])
@pytest.mark.parametrize("variant", ["ia3", "hidden"])
def test_block_matches_per_token_formula(make, variant):
    torch.manual_seed(0)
    block = make(variant)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if p.dim() == 2 and p in set(block.ce.parameters()) else 0.0))
    block.eval()  # deterministic sparsemixer
    x = torch.randn(12, 16)
    dy = torch.randn(12, 16)
    params = [block.experts.gate_up_proj, block.experts.down_proj, *block.ce.parameters()]

    xa = x.clone().requires_grad_()
    block(xa[None]).reshape(12, 16).backward(dy)
    got = [xa.grad] + [p.grad.clone() for p in params]
    block.zero_grad(set_to_none=True)

    xb = x.clone().requires_grad_()
    ref = _per_token_reference(block, xb)
    ref.backward(dy)
    want = [xb.grad] + [p.grad for p in params]
    with torch.no_grad():
        torch.testing.assert_close(block(x[None]).reshape(12, 16), ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):  # fp32 sums in another order: relative to the size of the values
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_block_runs_under_autocast():
    torch.manual_seed(0)
    block = _olmoe_block("ia3").eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    x = torch.randn(1, 10, 16)
    with torch.no_grad():
        full = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = block(x)
    torch.testing.assert_close(half.float(), full, rtol=5e-2, atol=5e-2 * float(full.abs().max()))
