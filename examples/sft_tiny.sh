#!/usr/bin/env bash
# Main job: a tiny OLMoE-shaped Compressed-Experts SFT on CPU from the bundled data, 2 ranks with
# expert parallelism 2 (4 layers, 32 experts, top-8 = 4 main + 4 compressed, random init), 3 epochs.
# Writes a checkpoint and TensorBoard events under runs/sft_tiny/ (a second run resumes from them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/sft_tiny}"
exec torchrun --nproc-per-node 2 -m megatron_ce.train \
    --model-config launch/configs/olmoe_tiny.json --moe-ce-num-compressed 4 \
    --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall \
    --data-path examples/data/sft_tiny.jsonl --tokenizer-model examples/data/tokenizer \
    --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --epochs 3 \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.03 --clip-grad 1.0 \
    --eval-split-fraction 0.05 --eval-interval 10 --log-interval 5 \
    --save "$OUT/ckpt" --save-interval 15 --tensorboard-dir "$OUT/tb" "$@"
