#!/usr/bin/env python
"""SFT step tokens/s: our megatron-core CE model vs the HF transformers OLMoE model with our HF CE block,
same tiny-but-wide config, same data (bundled SFT set), same process, CPU, forward + backward + AdamW.

  python tools/bench_train_throughput.py                  # default config
  python tools/bench_train_throughput.py --json --profile
  python tools/bench_train_throughput.py --smoke
"""

import argparse
import json
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--k-a", type=int, default=2, help="compressed experts among the top-k")
    ap.add_argument("--variant", choices=("ia3", "hidden"), default="ia3")
    ap.add_argument("--vocab", type=int, default=1024, help="the bundled tokenizer has 1024 tokens")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="profile one step of each and print the top ops")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.ffn, args.experts = 1, 64, 2, 32, 4
        args.batch, args.seq, args.warmup, args.steps = 2, 32, 1, 2

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    import torch

    from megatron_ce.paper.throughput import format_result, run
    from megatron_ce.runtime import destroy_parallel, init_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    init_parallel(seed=args.seed)
    try:
        res = run(args)
    finally:
        destroy_parallel()
    print(json.dumps(res, indent=1) if args.json else format_result(res))


if __name__ == "__main__":
    main()
