#!/usr/bin/env bash
# CE SFT of OLMoE-1B-7B (paper setting: top-8 = 4 main + 4 compressed experts, lr 2e-5, cosine, warmup
# 0.03, 2 epochs, seq 4096, global batch 128, bf16) on A100-80GB nodes.
#
#   PRETRAINED=ckpt/olmoe-ce TOKENIZER=allenai/OLMoE-1B-7B-0924 TASK=math bash launch/sft_olmoe_ce.sh
#
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set (see
# launch/slurm/sft.sbatch). DRY_RUN=1 prints the plan (memory per GPU term by term, checkpoint size and
# save time) and the torchrun command. Every setting is an env var:
# GPUS_PER_NODE TP PP EP N_CE CE_VARIANT CE_SPLIT CE_LR_MULT SEQ_LENGTH GLOBAL_BATCH MICRO_BATCH EPOCHS LR
# MIN_LR WARMUP_FRACTION DISPATCHER RECOMPUTE TASK DATA_PATH SFT_FORMAT SFT_PACKING SAVE TENSORBOARD_DIR
# SAVE_INTERVAL KEEP_CHECKPOINTS EVAL_INTERVAL OVERLAP PERMUTE_FUSION FUSIONS GPU_MEM_GIB CKPT_WRITE_GBPS
# DIST_TIMEOUT_MINUTES SHUTDOWN_TIMEOUT SIGTERM_LEAD EXTRA_ARGS (appended verbatim); see launch/common.sh.
# Default layout: one node, EP=8 (8 experts per GPU, the all-to-all on NVLink), ~35 GiB per GPU.
MODEL=olmoe
RUN_NAME="${RUN_NAME:-olmoe_ce_sft}"
: "${EP:=8}" "${N_CE:=4}" "${LR:=2e-5}" "${KEEP_CHECKPOINTS:=2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
