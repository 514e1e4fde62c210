#!/usr/bin/env python
"""Evaluate an exported HF model (CE or plain) with lm-eval; the result table is written beside it.

    python tools/evaluate.py --hf-model HF_DIR --preset paper-math            # GSM8K 0-shot CoT
    python tools/evaluate.py --hf-model HF_DIR --preset paper-coding --confirm-run-unsafe-code
    python tools/evaluate.py --hf-model HF_DIR --preset paper-general         # IFEval, BBH, TruthfulQA
    python tools/evaluate.py --hf-model HF_DIR --tasks gsm8k_cot_zeroshot,truthfulqa_mc2 --limit 50

HF_DIR is the output of tools/convert_megatron_to_hf.py. Writes HF_DIR/eval/results[_PRESET].json
(lm-eval's full results) and .md (the table, the paper's metrics first, and the equivalent `lm-eval run`
command). Presets (task, shots, metric): megatron_ce/eval/presets.py. Needs `pip install -e '.[eval]'`.
Exit codes: 0 done, 2 bad input (one line on stderr).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ce.eval.presets import preset_names  # noqa: E402
from megatron_ce.eval.runner import DTYPES, EvalError, EvalOptions  # noqa: E402


def _limit(value: str):
    """lm-eval's --limit: a count of documents per task, or a fraction (< 1) of each task."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    return int(x) if x >= 1 and x == int(x) else x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-model", required=True, help="exported HF model directory (config.json + safetensors)")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task/group names")
    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="the paper's tasks for one SFT domain (combined with --tasks if both are given)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="override the shots of every task (tasks whose config fixes 0 shots keep 0)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="documents per task (N) or fraction (<1): quick checks, not paper numbers")
    p.add_argument("--batch-size", default=None, help="int, auto or auto:N (default: auto on CUDA, 1 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="default auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--include-path", action="append", default=[],
                   help="a folder of extra lm-eval task YAMLs (repeatable); the bundled ce_tiny_* tasks "
                        "(megatron_ce/eval/tasks) are always included")
    p.add_argument("--output-path", default=None, help="where results go (default: HF_MODEL/eval)")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=True,
                   help="load modeling code shipped in HF_MODEL (on by default: CE exports need it)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (or Hub id) when HF_MODEL has no tokenizer files")
    p.add_argument("--max-length", type=int, default=None, help="max context length (default: from the config)")
    p.add_argument("--gen-kwargs", default=None, help="generation overrides, e.g. max_gen_toks=256")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (for chat-template SFT)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-generated code (humaneval, mbpp)")
    p.add_argument("--log-samples", action="store_true", help="also write every prompt/response per task")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = EvalOptions(
        hf_model=args.hf_model, tasks=args.tasks.split(","), preset=args.preset, num_fewshot=args.num_fewshot,
        limit=args.limit, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        include_path=args.include_path, output_path=args.output_path, trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer, max_length=args.max_length, gen_kwargs=args.gen_kwargs,
        apply_chat_template=args.apply_chat_template, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        log_samples=args.log_samples)
    from megatron_ce.eval.runner import run_evaluation

    try:
        out = run_evaluation(opts)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out["results"] is not None:
        print(out["markdown"])
        print(f"wrote {out['paths']['json']} and {out['paths']['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
