"""Naive, independent plain-torch reference of a Compressed-Experts (CE) MoE layer.

Follows docs/METHOD.md §1 ("The compressed-expert layer") literally.
Deliberately slow: explicit Python loops over tokens and experts, no megatron code, so that it can
serve as ground truth (outputs *and* autograd gradients) for the optimised implementation.

Numerics: router logits/scores are computed in fp32 (or fp64 if the inputs are fp64, so that
double-precision gradient checks stay exact); all expert math is done in that same compute dtype
and the result is cast back to ``x.dtype``.
"""

import math

import torch
import torch.nn.functional as F


def _compute_dtype(x):
    # fp32 at least (docs/METHOD.md §1: router in fp32); keep fp64 if given fp64.
    return torch.promote_types(x.dtype, torch.float32)


def _route(x, router_weight, topk, pre_softmax):
    """Returns, per token t, the ranked list [(expert_index, weight), ...] of length topk.

    pre_softmax=True  (OLMoE, norm_topk_prob=False): scores = softmax over all n experts,
                      rank top-k by score, weights = the raw softmax scores.
    pre_softmax=False (megatron-core default): rank top-k by logit, weights = softmax over the
                      k selected logits (computed over all k, before any main/aux split).
    Ranking is descending; ties go to the lower expert index (stable sort).
    """
    cdt = _compute_dtype(x)
    T = x.shape[0]
    n = router_weight.shape[0]
    assert 1 <= topk <= n, f"need 1 <= topk <= n, got topk={topk}, n={n}"
    logits = x.to(cdt) @ router_weight.to(cdt).t()  # [T, n]
    routes = []
    for t in range(T):
        if pre_softmax:
            scores = torch.softmax(logits[t], dim=-1)
            order = torch.sort(scores.detach(), descending=True, stable=True).indices[:topk]
            weights = [scores[int(i)] for i in order]
        else:
            order = torch.sort(logits[t].detach(), descending=True, stable=True).indices[:topk]
            sel = torch.stack([logits[t, int(i)] for i in order])
            probs = torch.softmax(sel, dim=-1)
            weights = [probs[r] for r in range(topk)]
        routes.append([(int(order[r]), weights[r]) for r in range(topk)])
    return routes


def _swiglu_expert(x_gate, x_up, wg, wu, wd, c_down=None):
    """y = W_d ( (silu(W_g x_gate) * W_u x_up) [* c_down] ) for one token, one expert."""
    g = wg @ x_gate  # [F]
    u = wu @ x_up  # [F]
    h = F.silu(g) * u  # [F]
    if c_down is not None:
        h = h * c_down
    return wd @ h  # [d]


def reference_ce_moe(x, router_weight, w_gate, w_up, w_down, thetas, topk, num_compressed,
                     variant="ia3", pre_softmax=True, keep=None):
    """x: [T, d]; router_weight: [n, d] (logits = x @ router_weight.T, computed in fp32);
    w_gate, w_up: [n, F, d] (expert e: g = w_gate[e] @ x_e); w_down: [n, d, F];
    thetas: dict -- variant "ia3": {"gate": [n, d], "up": [n, d], "down": [n, F]};
             variant "hidden": {"hidden": [n, d]};
    topk: k; num_compressed: k_a (0 <= k_a < k), k_m = k - k_a main experts.
    pre_softmax=True: scores = softmax over all n experts, top-k by score, main weights = raw scores
      (OLMoE, norm_topk_prob=False). pre_softmax=False: top-k on logits, weights = softmax over the k
      selected logits (megatron-core's default), computed before the main/aux split.
    Returns y: [T, d] = sum over main experts e of weight_e * y_e, with y_e per docs/METHOD.md §1.6 (ia3:
      W_d((silu(W_g(x*c_g)) * W_u(x*c_u)) * c_d); hidden: plain SwiGLU expert on x*theta_tok), c from the
      aux experts' thetas weighted by aux weights renormalised to sum 1 (item 3/5). k_a = 0 -> plain top-k MoE.
    Ranking: descending by score (ties: lower expert index first).
    keep: optional set of (token, expert) main selections that run (capacity dropping, see
      `capacity_keep`); the others contribute nothing, and the token's compressed experts are unchanged."""
    assert variant in ("ia3", "hidden"), variant
    k_a = int(num_compressed)
    assert 0 <= k_a < topk, f"need 0 <= num_compressed < topk, got {k_a}, {topk}"
    k_m = topk - k_a
    cdt = _compute_dtype(x)
    T, d = x.shape
    routes = _route(x, router_weight, topk, pre_softmax)

    out_rows = []
    for t in range(T):
        xt = x[t].to(cdt)
        ranked = routes[t]
        main = ranked[:k_m]  # ranks 1..k_m
        aux = ranked[k_m:]  # ranks k_m+1..k

        # Item 3: aux weights renormalised among themselves.  Item 5: per-token c vectors.
        c_gate = c_up = c_down = None
        if k_a > 0:
            aux_total = sum(w for _, w in aux)
            aux_w = [(j, w / aux_total) for j, w in aux]
            if variant == "ia3":
                c_gate = sum(w * thetas["gate"][j].to(cdt) for j, w in aux_w)
                c_up = sum(w * thetas["up"][j].to(cdt) for j, w in aux_w)
                c_down = sum(w * thetas["down"][j].to(cdt) for j, w in aux_w)
            else:  # "hidden": one theta in R^d, c^g = c^u = theta_tok, c^d = 1 (item 8)
                theta_tok = sum(w * thetas["hidden"][j].to(cdt) for j, w in aux_w)
                c_gate = c_up = theta_tok
        x_gate = xt * c_gate if c_gate is not None else xt
        x_up = xt * c_up if c_up is not None else xt

        # Items 2 and 6: main experts weighted by their own (un-renormalised) router weight;
        # the same c vectors serve every main expert of this token.
        yt = torch.zeros(d, dtype=cdt, device=x.device)
        for e, w_e in main:
            if keep is not None and (t, e) not in keep:
                continue
            y_e = _swiglu_expert(x_gate, x_up, w_gate[e].to(cdt), w_up[e].to(cdt),
                                 w_down[e].to(cdt), c_down)
            yt = yt + w_e * y_e
        out_rows.append(yt)
    return torch.stack(out_rows).to(x.dtype)


def reference_topk_main_only(x, router_weight, w_gate, w_up, w_down, topk, k_main,
                             pre_softmax=True):
    """Plain MoE that sends each token to the first `k_main` experts of its top-`topk` ranking,
    weighting each with the SAME weight it had under top-`topk` routing (no renormalisation).
    This is what reference_ce_moe must equal when all thetas are 1 (docs/METHOD.md §1.7)."""
    assert 1 <= k_main <= topk, f"need 1 <= k_main <= topk, got {k_main}, {topk}"
    cdt = _compute_dtype(x)
    T, d = x.shape
    routes = _route(x, router_weight, topk, pre_softmax)
    out_rows = []
    for t in range(T):
        xt = x[t].to(cdt)
        yt = torch.zeros(d, dtype=cdt, device=x.device)
        for e, w_e in routes[t][:k_main]:
            yt = yt + w_e * _swiglu_expert(xt, xt, w_gate[e].to(cdt), w_up[e].to(cdt),
                                           w_down[e].to(cdt))
        out_rows.append(yt)
    return torch.stack(out_rows).to(x.dtype)


def _plain_topk_moe_vectorised(x, router_weight, w_gate, w_up, w_down, topk, pre_softmax=True):
    """Independent, vectorised plain top-k MoE (uses torch.topk) for the self-check only."""
    logits = x.double() @ router_weight.double().t()
    if pre_softmax:
        probs, idx = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    else:
        vals, idx = torch.topk(logits, topk, dim=-1)
        probs = torch.softmax(vals, -1)
    dense = torch.zeros_like(logits).scatter(1, idx, probs)  # [T, n]
    g = torch.einsum("nfd,td->tnf", w_gate.double(), x.double())
    u = torch.einsum("nfd,td->tnf", w_up.double(), x.double())
    y = torch.einsum("ndf,tnf->tnd", w_down.double(), F.silu(g) * u)
    return (dense.unsqueeze(-1) * y).sum(1).to(x.dtype)


if __name__ == "__main__":
    torch.manual_seed(0)
    T, d, Fd, n, k = 7, 12, 20, 8, 4  # Fd > d on purpose (the Phi-MoE case, item 4)
    dt = torch.float64

    def rand(*s):
        return torch.randn(*s, dtype=dt)

    x = rand(T, d)
    rw = rand(n, d)
    wg, wu, wd = rand(n, Fd, d) * 0.3, rand(n, Fd, d) * 0.3, rand(n, d, Fd) * 0.3
    ones_ia3 = {"gate": torch.ones(n, d, dtype=dt), "up": torch.ones(n, d, dtype=dt),
                "down": torch.ones(n, Fd, dtype=dt)}
    ones_hid = {"hidden": torch.ones(n, d, dtype=dt)}

    for pre in (True, False):
        # k_a = 0 -> plain top-k MoE (both variants, arbitrary thetas are unused).
        plain = _plain_topk_moe_vectorised(x, rw, wg, wu, wd, k, pre)
        rnd_ia3 = {"gate": rand(n, d), "up": rand(n, d), "down": rand(n, Fd)}
        rnd_hid = {"hidden": rand(n, d)}
        for var, th in (("ia3", rnd_ia3), ("hidden", rnd_hid)):
            y0 = reference_ce_moe(x, rw, wg, wu, wd, th, k, 0, var, pre)
            torch.testing.assert_close(y0, plain, rtol=1e-12, atol=1e-12)
        # all thetas = 1 -> plain top-k_m with the top-k weights.
        for k_a in range(0, k):
            ref = reference_topk_main_only(x, rw, wg, wu, wd, k, k - k_a, pre)
            for var, th in (("ia3", ones_ia3), ("hidden", ones_hid)):
                y = reference_ce_moe(x, rw, wg, wu, wd, th, k, k_a, var, pre)
                torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        # With k_a > 0 and random thetas the output must actually change.
        y = reference_ce_moe(x, rw, wg, wu, wd, rnd_ia3, k, 2, "ia3", pre)
        assert not torch.allclose(y, reference_topk_main_only(x, rw, wg, wu, wd, k, k - 2, pre))

    # Differentiability: gradcheck through x, router, expert weights and thetas (fp64).
    # Small sizes to keep gradcheck quick (F > d still).
    gd, gF, gn = 4, 5, 6
    xs = rand(3, gd).requires_grad_()
    params = [rand(gn, gd).requires_grad_(), (0.5 * rand(gn, gF, gd)).requires_grad_(),
              (0.5 * rand(gn, gF, gd)).requires_grad_(), (0.5 * rand(gn, gd, gF)).requires_grad_()]
    th = {kk: (1 + 0.1 * rand(gn, sz)).requires_grad_()
          for kk, sz in (("gate", gd), ("up", gd), ("down", gF))}
    for pre in (True, False):
        f = lambda xs, rw_, wg_, wu_, wd_, tg, tu, tdn: reference_ce_moe(
            xs, rw_, wg_, wu_, wd_, {"gate": tg, "up": tu, "down": tdn}, k, 2, "ia3", pre)
        assert torch.autograd.gradcheck(f, (xs, *params, th["gate"], th["up"], th["down"]))
        th_h = (1 + 0.1 * rand(gn, gd)).requires_grad_()
        fh = lambda xs, rw_, wg_, wu_, wd_, t: reference_ce_moe(
            xs, rw_, wg_, wu_, wd_, {"hidden": t}, k, 1, "hidden", pre)
        assert torch.autograd.gradcheck(fh, (xs, *params, th_h))

    # Gradients reach theta only through auxiliary selections (item 7).
    th = {kk: v.clone().requires_grad_() for kk, v in ones_ia3.items()}
    reference_ce_moe(x.clone().requires_grad_(), rw, wg, wu, wd, th, k, 0, "ia3").sum().backward()
    assert all(v.grad is None or v.grad.abs().max() == 0 for v in th.values())
    th = {kk: v.clone().requires_grad_() for kk, v in ones_ia3.items()}
    reference_ce_moe(x, rw, wg, wu, wd, th, k, 2, "ia3").sum().backward()
    aux_sel = set()
    for r in _route(x, rw, k, True):
        aux_sel |= {e for e, _ in r[k - 2:]}
    for name, v in th.items():
        nz = set(torch.nonzero(v.grad.abs().sum(-1)).flatten().tolist())
        assert nz <= aux_sel and nz, (name, nz, aux_sel)

    # Low-precision input: output dtype follows x.
    yb = reference_ce_moe(x.bfloat16(), rw.bfloat16(), wg.bfloat16(), wu.bfloat16(),
                          wd.bfloat16(), ones_ia3, k, 1)
    assert yb.dtype == torch.bfloat16 and yb.shape == (T, d)
    print("reference.py self-check OK")


def main_selections(x, router_weight, topk, k_main, pre_softmax=True):
    """Per token, the main experts [(expert, weight)] (the first k_main of the ranked top-k)."""
    return [r[:k_main] for r in _route(x, router_weight, topk, pre_softmax)]


def capacity_keep(main_sel, num_experts, capacity_factor, per_token, policy="probs"):
    """Token dropping on main selections: each expert keeps at most C = ceil(T * per_token / n * cf)
    of the tokens routed to it, the highest-weight ones ("probs") or the earliest ("position").
    Returns the set of kept (token, expert)."""
    T = len(main_sel)
    cap = math.ceil(T * per_token / num_experts * capacity_factor)
    keep = set()
    for e in range(num_experts):
        routed = [(t, float(w.detach())) for t, sel in enumerate(main_sel) for j, w in sel if j == e]
        if policy == "probs":
            routed.sort(key=lambda tw: -tw[1])
        keep.update((t, e) for t, _ in routed[:cap])
    return keep
