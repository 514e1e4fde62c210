"""RoutingStats: its router hooks must not synchronise with the host, and what it reports must equal
the statistics recomputed from the captured router outputs with plain torch (the module doc of
megatron_ce/training/metrics.py defines them).

The hooks run on CPU here, so a device-to-host sync cannot be observed directly; instead every tensor
method that forces one on a GPU (.item, .tolist, .cpu, .numpy, bool/float/int(tensor), and the ops
whose output size depends on the data: nonzero, unique, bincount) raises while a hook runs."""

import contextlib

import pytest
import torch

from megatron_ce.training.metrics import RoutingStats
from tests.ce.layer_utils import build_moe, ce_config, randomize

N, K, T = 8, 4, 24

SYNCING = {
    torch.Tensor: ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
                   "nonzero", "unique"),
    torch: ("nonzero", "unique", "bincount"),  # CUDA bincount reads its max back to size the output
}


@pytest.fixture(scope="module")
def world():
    from megatron_ce.runtime import init_parallel

    init_parallel(seed=1234)


class _Model(torch.nn.Module):
    """What RoutingStats reads of a GPT model: `.config` and MoE layers with their layer numbers."""

    def __init__(self, cfg, layers):
        super().__init__()
        self.config = cfg
        self.layers = torch.nn.ModuleList(layers)
        for n, layer in enumerate(layers, start=1):
            layer.layer_number = n


@contextlib.contextmanager
def _no_sync(calls):
    saved = [(owner, name, getattr(owner, name)) for owner, names in SYNCING.items() for name in names]

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"RoutingStats hook called {name}: a device-to-host sync")
        return f

    try:
        for owner, name, _ in saved:
            setattr(owner, name, refuse(name))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _guard_hooks(stats, calls):
    """Wrap RoutingStats's own hooks (not the rest of the forward) in the no-sync guard."""
    for layer in stats.layers.values():
        hooks = layer.router._forward_hooks
        for h in stats._handles:
            if h.id in hooks:
                fn = hooks[h.id]

                def guarded(*a, _fn=fn, **k):
                    with _no_sync(calls):
                        return _fn(*a, **k)
                hooks[h.id] = guarded


def _capture(model):
    """Records every router call's (input, probs, routing_map)."""
    seen = {}
    for n, layer in enumerate(model.layers, start=1):
        def hook(router, inputs, output, n=n):
            seen.setdefault(n, []).append((inputs[0].detach(), output[0].detach(), output[1].detach()))
        layer.router.register_forward_hook(hook)
    return seen


def _main_map(probs, routing_map, cfg):
    """Main experts per token, from the split's definition: the best-weighted k_m of the top-k (fixed),
    or the shortest best-first prefix holding >= tau of the top-k mass, clamped (mass)."""
    out = torch.zeros_like(routing_map)
    for t in range(probs.shape[0]):
        sel = [e for e in range(probs.shape[1]) if routing_map[t, e]]
        sel.sort(key=lambda e: -float(probs[t, e]))
        if cfg.moe_ce_split == "fixed":
            m = K - cfg.moe_ce_num_compressed
        else:
            w = [float(probs[t, e]) for e in sel]
            m, acc = 1, w[0]
            while m < len(w) and acc < cfg.moe_ce_main_mass * sum(w):
                acc += w[m]
                m += 1
            m = min(max(m, cfg.moe_ce_min_main), cfg.moe_ce_max_main)
        for e in sel[:m]:
            out[t, e] = True
    return out


def _expected(seen, router_weights, cfg, aux_coeff):
    out = {"layer": sorted(seen)}
    for n in out["layer"]:
        x = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in seen[n]]).double()
        probs = torch.cat([c[1] for c in seen[n]]).double()
        rmap = torch.cat([c[2] for c in seen[n]])
        main = _main_map(probs, rmap, cfg)
        load = main.double().sum(0)
        routed = (probs * rmap).sum(-1)
        scores = torch.softmax(x @ router_weights[n].detach().double().t(), dim=-1)
        hist = [float((main.sum(-1) == m).sum()) for m in range(N + 1)]
        lb = N * float(((rmap.double().sum(0) / (len(x) * K)) * scores.mean(0)).sum())
        vals = dict(load_min=float(load.min()), load_max=float(load.max()),
                    load_cv=float(load.std(unbiased=False) / load.mean()),
                    aux_mass=float((1 - (probs * main).sum(-1) / routed).mean()),
                    main_per_token=float(main.sum(-1).double().mean()), main_per_token_hist=hist,
                    lb_loss=lb, aux_loss=aux_coeff * lb)
        for k, v in vals.items():
            out.setdefault(k, []).append(v)
    return out


@pytest.mark.parametrize("split", ["fixed", "mass"])
def test_hooks_do_not_sync_and_counts_match(world, split):
    extra = dict(moe_ce_split="mass", moe_ce_main_mass=0.6, moe_ce_num_compressed=0,
                 moe_ce_min_main=1, moe_ce_max_main=3) if split == "mass" else {}
    kw = dict(n=N, k=K, k_a=2, **extra)
    cfg = ce_config(**kw)
    layers = [build_moe(ce_config(**kw)) for _ in range(2)]
    for s, layer in enumerate(layers):
        randomize(layer, seed=s)
    model = _Model(cfg, layers)
    stats = RoutingStats(model, num_layers=3, num_experts=N)  # layer 3: not on this stage
    calls = []
    _guard_hooks(stats, calls)
    seen = _capture(model)
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(2):  # two micro-batches accumulate
            for layer in layers:
                layer(torch.randn(T // 2, 2, cfg.hidden_size, generator=g))
        with torch.no_grad():  # not counted in training mode (eval / recompute's first pass)
            layers[0](torch.randn(T // 2, 2, cfg.hidden_size, generator=g))
        assert calls == []
        got = stats.reduce_and_reset(topk=K, aux_coeff=0.01)
    finally:
        stats.close()
    assert len(seen[1]) == 3 and len(seen[2]) == 2
    seen[1] = seen[1][:2]  # drop the last call: the no_grad one
    want = _expected({1: seen[1], 2: seen[2]}, {1: layers[0].router.weight, 2: layers[1].router.weight},
                     cfg, 0.01)
    assert got["layer"] == want["layer"] == [1, 2]
    assert got["main_per_token_hist"] == want["main_per_token_hist"]
    for key in ("load_min", "load_max", "load_cv", "aux_mass", "main_per_token", "lb_loss", "aux_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    # reset: a second interval without forwards reports no layers
    assert stats.reduce_and_reset(topk=K, aux_coeff=0.01) == {"layer": []}
