#!/usr/bin/env python
"""Time one MoE layer: top-k vs top-k/2 vs top-k/2 + CE (both variants), same tokens, same process.

    python tools/bench_moe_layer.py --shape olmoe --tokens 1024 --repeats 5 [--json]

Prints forward and forward+backward milliseconds per configuration and the ratio to top-k/2 (the
CE overhead is the `+CE` rows' ratio - 1). All configurations share one set of weights.
"""

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ce.models import registry  # noqa: E402

# Each family's presets (megatron_ce/models/<family>/presets.py): hidden d, expert ffn, n experts, top-k
# of the paper models (docs/METHOD.md §2, §3); --smoke: the same code path at shapes a CPU runs in
# seconds (test-suite, gpu_check --cpu-dry-run).
SHAPES = {mt: registry.presets(mt).bench_shape for mt in registry.builtin_model_types()}
SMOKE_SHAPES = {mt: registry.presets(mt).smoke_shape for mt in registry.builtin_model_types()}


def build(shape, k, k_a, variant, experts, dtype):
    from megatron_ce.ce import CETransformerConfig, build_ce_moe_layer

    cfg = CETransformerConfig(
        num_layers=1,
        hidden_size=shape["d"],
        num_attention_heads=16,
        num_moe_experts=shape["n"],
        moe_router_topk=k,
        moe_ffn_hidden_size=shape["ffn"],
        ffn_hidden_size=shape["ffn"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        moe_router_pre_softmax=True,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        moe_token_dispatcher_type="alltoall",
        moe_ce_num_compressed=k_a,
        moe_ce_variant=variant,
    )
    return build_ce_moe_layer(cfg, grouped_gemm=experts == "grouped")


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--experts", choices=["sequential", "grouped"], default="grouped")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights/activations (GPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (d 64): checks the code path, times nothing useful")
    return ap.parse_args(argv)


def build_layers(shape, experts, dtype, device):
    """{name: layer} of the four configurations, all on one set of weights (and one copy in memory)."""
    k = shape["k"]
    configs = {  # name -> (top-k, k_a, variant)
        f"top{k}": (k, 0, "ia3"),
        f"top{k // 2}": (k // 2, 0, "ia3"),
        f"top{k // 2}+ce_ia3": (k, k // 2, "ia3"),
        f"top{k // 2}+ce_hidden": (k, k // 2, "hidden"),
    }
    layers = {}
    for name, (topk, k_a, variant) in configs.items():
        layer = build(shape, topk, k_a, variant, experts, dtype).to(device)
        if not layers:
            with torch.no_grad():
                for p in layer.parameters():
                    p.normal_(0, 0.02)
            base_layer = layer
        else:
            layer.experts = base_layer.experts
            layer.router.weight = base_layer.router.weight
        layers[name] = layer  # CE tables stay at their init (ones)
    return layers


def measure(layers, x, repeats, sync, base):
    """Median fwd and fwd+bwd milliseconds per configuration and their ratios to `base`."""

    def fwd(layer):
        with torch.no_grad():
            layer(x)

    def fwd_bwd(layer):
        out, _ = layer(x.detach().requires_grad_(True))
        out.sum().backward()

    # Interleave configurations round by round so load changes on the machine hit all alike.
    samples = {name: {"fwd_ms": [], "fwd_bwd_ms": []} for name in layers}
    for rnd in range(repeats + 1):
        for name, layer in layers.items():
            for key, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
                ms = timed(lambda: fn(layer), sync)
                if rnd > 0:  # round 0 is warm-up
                    samples[name][key].append(ms)
            layer.zero_grad(set_to_none=True)
    results = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    for r in results.values():
        r["fwd_ratio"] = r["fwd_ms"] / results[base]["fwd_ms"]
        r["fwd_bwd_ratio"] = r["fwd_bwd_ms"] / results[base]["fwd_bwd_ms"]
    return results


def main(argv=None):
    args = parse_args(argv)
    from megatron_ce.runtime import init_parallel

    init_parallel()
    torch.manual_seed(0)
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)[args.shape]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base = f"top{shape['k'] // 2}"
    x = torch.randn(args.tokens, 1, shape["d"], dtype=dtype, device=device)  # before the weights: same RNG use
    layers = build_layers(shape, args.experts, dtype, device)
    results = measure(layers, x, args.repeats, sync, base)
    meta = dict(shape=args.shape, tokens=args.tokens, experts=args.experts, dtype=str(dtype),
                device=device, baseline=base)
    if args.json:
        print(json.dumps({"meta": meta, **results}))
        return results
    print(f"MoE layer, {args.shape} shape {shape}, {args.tokens} tokens, {args.experts} experts, "
          f"{dtype}, {device}; ratios to {base}")
    print(f"{'config':<18}{'fwd ms':>10}{'ratio':>8}{'fwd+bwd ms':>13}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:<18}{r['fwd_ms']:>10.1f}{r['fwd_ratio']:>8.3f}"
              f"{r['fwd_bwd_ms']:>13.1f}{r['fwd_bwd_ratio']:>8.3f}")
    return results


if __name__ == "__main__":
    main()
