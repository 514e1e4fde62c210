#!/usr/bin/env bash
# CE SFT of OLMoE-1B-7B (paper setting: top-8 = 4 main + 4 compressed experts, lr 2e-5, cosine, warmup
# 0.03, 2 epochs, seq 4096, global batch 128, bf16) on A100-80GB nodes.
#
#   PRETRAINED=ckpt/olmoe-ce TOKENIZER=allenai/OLMoE-1B-7B-0924 TASK=math bash launch/sft_olmoe_ce.sh
#
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set (see
# launch/slurm/sft.sbatch). DRY_RUN=1 prints the torchrun command. Every setting is an env var:
# GPUS_PER_NODE TP PP EP N_CE CE_VARIANT SEQ_LENGTH GLOBAL_BATCH MICRO_BATCH EPOCHS LR MIN_LR
# WARMUP_FRACTION DISPATCHER RECOMPUTE TASK DATA_PATH SFT_FORMAT SFT_PACKING SAVE TENSORBOARD_DIR
# SAVE_INTERVAL EVAL_INTERVAL EXTRA_ARGS (appended verbatim).
MODEL=olmoe
RUN_NAME="${RUN_NAME:-olmoe_ce_sft}"
: "${EP:=8}" "${N_CE:=4}" "${LR:=2e-5}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
