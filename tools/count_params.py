#!/usr/bin/env python
"""Total and active parameters per token of OLMoE / Phi-MoE with and without Compressed Experts.

Exact counts come from the megatron-core model built on the meta device (no memory); beside them the
paper's formula and figures (arXiv 2503.00634: Phi-MoE 7.45B -> 4.93B, -33.8%; OLMoE 1.28B -> 878M,
-31.4%).

  python tools/count_params.py --model olmoe
  python tools/count_params.py --model phimoe --json
  python tools/count_params.py --model path/to/config.json --moe-router-topk 4 --moe-ce-num-compressed 2
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="olmoe | phimoe | PATH/config.json")
    ap.add_argument("--moe-router-topk", type=int, default=None, help="k (default: the config's)")
    ap.add_argument("--moe-ce-num-compressed", type=int, default=None,
                    help="k_a compressed experts among the top-k (default: k/2)")
    ap.add_argument("--moe-ce-variant", choices=("ia3", "hidden"), default="ia3")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    from megatron_ce.paper.configs import load_model_config
    from megatron_ce.paper.params import count_params, format_report
    from megatron_ce.runtime import destroy_parallel, init_parallel

    family, cfg = load_model_config(args.model)
    topk = args.moe_router_topk or int(cfg["num_experts_per_tok"])
    k_a = topk // 2 if args.moe_ce_num_compressed is None else args.moe_ce_num_compressed
    init_parallel()
    try:
        res = count_params(family, cfg, topk=topk, k_a=k_a, variant=args.moe_ce_variant)
    finally:
        destroy_parallel()
    print(json.dumps(res, indent=1) if args.json else format_report(res))


if __name__ == "__main__":
    main()
