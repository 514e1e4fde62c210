#!/usr/bin/env python
"""Convert a megatron-core dist checkpoint (saved at any TP/EP/PP) to an HF model directory.

    python tools/convert_megatron_to_hf.py --load-dir MEGATRON_DIR --save-dir HF_DIR \
        [--dtype auto] [--max-shard-size 2GB] [--format native|reference]

MEGATRON_DIR is a save dir with latest_checkpointed_iteration.txt, or a checkpoint directory itself.
The model is described by megatron_ce.json (written by convert_hf_to_megatron.py); without it pass
--hf-config CONFIG_JSON (and --moe-ce-num-compressed / --moe-ce-variant for a CE model).
Writes model.safetensors (or, above --max-shard-size, model-0000i-of-0000N.safetensors shards +
model.safetensors.index.json), config.json, generation_config.json and the tokenizer files; experts in
the per-expert layout that every transformers version loads.

Tokenizer: --tokenizer DIR (a folder or hub name), else the one recorded with the checkpoint (a
trainer checkpoint's iter_N/tokenizer/, a converted one's hf_files/; megatron_ce/hf/tokenizer_files.py);
with neither, a warning and an export without one. generation_config.json takes bos/eos/pad from the
tokenizer (else config.json).

--format native (default): a CE model gets our tables (`mlp.ce.*`), model_type `<family>_ce` and the
modeling code beside the weights (AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)).
--format reference: the reference implementation's layout (OLMoE only, ia3, k_a >= 1, ffn <= hidden):
`model.layers.N.mlp.ces` [n, 3, hidden] (slots: gate, down in the first ffn entries padded with ones,
up), config.json = OLMoE's (model_type olmoe) plus `n_ce`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ce.convert.cli import quiet_environment_warnings, run_conversion  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="Megatron save dir or dist checkpoint dir")
    p.add_argument("--save-dir", required=True, help="output HF model directory")
    p.add_argument("--dtype", default="auto", help="auto (keep) | fp32 | bf16 | fp16")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (e.g. 2GB, 500MB)")
    p.add_argument("--hf-config", default=None, help="config.json of the model (when megatron_ce.json is absent)")
    p.add_argument("--model-type", default=None, help="override the model family")
    p.add_argument("--moe-ce-num-compressed", type=int, default=None, help="override k_a")
    p.add_argument("--moe-ce-variant", choices=("ia3", "hidden"), default=None, help="override the CE variant")
    p.add_argument("--format", choices=("native", "reference"), default="native",
                   help="CE tables as ours (native) or as the reference implementation's `ces` tensor")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub name to ship with the export (default: the one recorded with "
                        "the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    quiet_environment_warnings()

    def convert():
        from megatron_ce.convert import convert_megatron_to_hf
        from megatron_ce.hf.export import convert_megatron_to_reference
        from megatron_ce.hf.tokenizer_files import missing_tokenizer_note, tokenizer_source

        export = convert_megatron_to_reference if args.format == "reference" else convert_megatron_to_hf
        shards = export(
            args.load_dir,
            args.save_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            hf_config=args.hf_config,
            model_type=args.model_type,
            moe_ce_num_compressed=args.moe_ce_num_compressed,
            moe_ce_variant=args.moe_ce_variant,
            tokenizer=args.tokenizer,  # the export writes it (or the recorded one) + generation_config.json
            progress=not args.no_progress,
        )
        tokenizer = tokenizer_source(args.load_dir, args.tokenizer)
        if tokenizer is None:
            print(missing_tokenizer_note(args.save_dir), file=sys.stderr)
        done = f"wrote {len(shards)} shard(s) to {args.save_dir}"
        return done + (f" with the tokenizer from {tokenizer}" if tokenizer else "")

    return run_conversion(convert)


if __name__ == "__main__":
    sys.exit(main())
