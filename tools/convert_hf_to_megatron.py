#!/usr/bin/env python
"""Convert an HF model directory (safetensors) to a megatron-core dist checkpoint.

    python tools/convert_hf_to_megatron.py --load-dir HF_DIR --save-dir MEGATRON_DIR \
        [--moe-ce-num-compressed N] [--moe-ce-variant ia3|hidden] [--model-type olmoe] [--dtype auto]

The checkpoint (SAVE_DIR/release, tracker file latest_checkpointed_iteration.txt) loads at any
TP/EP/PP with megatron-core dist-checkpointing. The model family is read from config.json.
HF_DIR's tokenizer and generation_config files are kept in SAVE_DIR/hf_files/, from where
convert_megatron_to_hf.py copies them into its export (megatron_ce/hf/tokenizer_files.py).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ce.convert.cli import quiet_environment_warnings, run_conversion  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--save-dir", required=True, help="output Megatron checkpoint directory")
    p.add_argument("--moe-ce-num-compressed", type=int, default=None,
                   help="k_a: compressed experts per token (adds CE tables, initialised to ones when "
                        "the HF checkpoint has none). Default: from config.json, else 0")
    p.add_argument("--moe-ce-variant", choices=("ia3", "hidden"), default=None,
                   help="CE variant (default: from config.json, else ia3)")
    p.add_argument("--model-type", default=None, help="override config.json's model_type")
    p.add_argument("--dtype", default="auto", help="auto (keep) | fp32 | bf16 | fp16")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    quiet_environment_warnings()

    def convert():
        from megatron_ce.convert import convert_hf_to_megatron

        out = convert_hf_to_megatron(
            args.load_dir,
            args.save_dir,
            moe_ce_num_compressed=args.moe_ce_num_compressed,
            moe_ce_variant=args.moe_ce_variant,
            model_type=args.model_type,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
        return f"wrote {out}"

    return run_conversion(convert)


if __name__ == "__main__":
    sys.exit(main())
