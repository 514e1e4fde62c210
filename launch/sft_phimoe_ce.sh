#!/usr/bin/env bash
# CE SFT of Phi-3.5-MoE (paper setting: top-2 = 1 main + 1 compressed expert, lr 1e-5, cosine, warmup
# 0.03, 2 epochs, seq 4096, global batch 128, bf16) on 80 GB GPUs (A100/H100).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 PRETRAINED=ckpt/phimoe-ce \
#   TOKENIZER=microsoft/Phi-3.5-MoE-instruct TASK=math bash launch/sft_phimoe_ce.sh
#
# Default layout: 4 nodes x 8 GPUs, TP=1 PP=4 EP=8 (DP 8, 2 experts per GPU, 16 micro-batches per step),
# no activation recompute: megatron-core's own Mixtral 8x7B recipe (TP1 PP4 EP8). Why:
# - 41.9B parameters, 96% of them in the experts: their fp32 grads and Adam state dominate memory, so
#   they must be split 8+ ways per GPU. EP=8 with PP=4 puts 2 experts x 8 layers on each GPU.
# - megatron-core orders ranks tp-ep-dp-pp, so with PP=4 over 4 nodes each node is one pipeline stage:
#   the MoE all-to-all (EP 8) and the dense-gradient reduce-scatter (DP 8) stay on NVLink; only the
#   pipeline's activations ([s, b, d] bf16, 32 MB a micro-batch) cross the inter-node network. The former
#   default, EP=16 over 2 nodes, sent every layer's all-to-all across nodes.
# - launch/plan.py estimates ~53 GiB per GPU (stage 0, 4 micro-batches in flight) without recompute,
#   leaving room for uneven routing (SFT runs without the load-balancing loss); EP=16 PP=1 without
#   recompute needs ~85 GiB. The pipeline bubble costs (PP-1)/16 = 19% of a step, less than full
#   recompute's extra forward (~33%). TP=1 PP=2 EP=8 is also estimated to fit (~63 GiB) with a 12.5%
#   bubble, but with little headroom and the expert gradients reduced across nodes.
# - 2 nodes (16 GPUs): TP=1 PP=2 EP=8 RECOMPUTE=1 (~59 GiB), or TP=2 PP=4 EP=2 without recompute (~67 GiB,
#   faster, little headroom). DRY_RUN=1 prints the estimate and, when a layout does not fit or spreads EP
#   over nodes, a suggestion.
#
# Same env vars as launch/sft_olmoe_ce.sh; DRY_RUN=1 prints the plan and the torchrun command.
MODEL=phimoe
RUN_NAME="${RUN_NAME:-phimoe_ce_sft}"
: "${NNODES:=4}" "${TP:=1}" "${PP:=4}" "${EP:=8}" "${N_CE:=1}" "${LR:=1e-5}" "${RECOMPUTE:=0}"
# A save is ~586 GB (84 GB bf16 weights + 503 GB fp32 master weights and Adam moments): keep two.
: "${KEEP_CHECKPOINTS:=2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
