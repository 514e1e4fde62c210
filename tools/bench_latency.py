#!/usr/bin/env python
"""Generation latency of top-k, top-k/2 and top-k/2+CE (both variants) of one model, the paper's method:
batch 8, 32 random prompt tokens, greedy generation of a fixed number of new tokens with a KV cache,
10 warm-up + 30 timed iterations, mean and std (paper: Phi-MoE 5.59 / 4.01 / 4.35 s; OLMoE
7.14 / 5.31 / 5.83 s). Random weights built from the config (no download).

  python tools/bench_latency.py --model olmoe --num-layers 4 --scale 4          # CPU, reduced
  python tools/bench_latency.py --model olmoe --device cuda --dtype bf16        # GPU, full shape
  python tools/bench_latency.py --smoke
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="olmoe", help="olmoe | phimoe | PATH/config.json")
    ap.add_argument("--num-layers", type=int, default=None, help="reduce depth")
    ap.add_argument("--scale", type=int, default=1, help="divide hidden, ffn and heads by this (head_dim kept)")
    ap.add_argument("--num-experts", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128, help="fixed number of generated tokens")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few tokens, 1+2 iterations")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from megatron_ce.paper.configs import load_model_config
    from megatron_ce.paper.latency import format_table, run_latency, scaled_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.num_layers, args.scale, args.num_experts = 2, 16, 8
        args.new_tokens, args.warmup, args.iters = min(args.new_tokens, 4), 1, 2
    family, cfg = load_model_config(args.model)
    cfg = scaled_config(family, cfg, args.num_layers, args.scale, args.num_experts)
    if args.smoke:
        cfg.update(vocab_size=512, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    n = cfg.get("num_experts") or cfg.get("num_local_experts")
    print(f"{family}: {cfg['num_hidden_layers']} layers, d {cfg['hidden_size']}, ffn {cfg['intermediate_size']}, "
          f"{n} experts top-{cfg['num_experts_per_tok']}, vocab {cfg['vocab_size']}; batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.warmup} warm-up + {args.iters} timed; "
          f"{args.device} {dtype}, {torch.get_num_threads()} threads", flush=True)
    res = run_latency(family, cfg, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      warmup=args.warmup, iters=args.iters, dtype=dtype, device=args.device, seed=args.seed,
                      log=(lambda *a: None) if args.json else print)
    res.update(model=family, config=cfg, device=args.device, dtype=str(dtype), batch=args.batch,
               prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup)
    print(json.dumps(res, indent=1, default=str) if args.json else format_table(res))


if __name__ == "__main__":
    main()
