#!/usr/bin/env bash
# CE SFT of Phi-3.5-MoE (paper setting: top-2 = 1 main + 1 compressed expert, lr 1e-5, cosine, warmup
# 0.03, 2 epochs, seq 4096, global batch 128, bf16) on A100-80GB nodes. 42B parameters: the default
# layout is 2 nodes x 8 GPUs, one expert per GPU (EP=16), full activation recompute.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 PRETRAINED=ckpt/phimoe-ce \
#   TOKENIZER=microsoft/Phi-3.5-MoE-instruct TASK=math bash launch/sft_phimoe_ce.sh
#
# Same env vars as launch/sft_olmoe_ce.sh; DRY_RUN=1 prints the torchrun command.
MODEL=phimoe
RUN_NAME="${RUN_NAME:-phimoe_ce_sft}"
: "${NNODES:=2}" "${EP:=16}" "${N_CE:=1}" "${LR:=1e-5}" "${RECOMPUTE:=1}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
