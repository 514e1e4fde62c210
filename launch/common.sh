# Shared body of launch/sft_*_ce.sh (sourced after the model script sets its defaults).
# Validates the layout (launch/plan.py) before torchrun starts, prints the per-GPU memory estimate,
# then runs (or, with DRY_RUN=1, prints) the torchrun command.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}" "${GPUS_PER_NODE:=8}"
: "${TP:=1}" "${PP:=1}" "${SEQ_LENGTH:=4096}" "${GLOBAL_BATCH:=128}" "${MICRO_BATCH:=1}" "${EPOCHS:=2}"
: "${MIN_LR:=0}" "${WARMUP_FRACTION:=0.03}" "${WEIGHT_DECAY:=0}" "${CLIP_GRAD:=1.0}"
: "${CE_VARIANT:=ia3}" "${DISPATCHER:=alltoall}" "${RECOMPUTE:=0}" "${TRANSFORMER_IMPL:=transformer_engine}"
: "${SFT_FORMAT:=alpaca}" "${SFT_PACKING:=reference}" "${TASK:=math}" "${DATA_PATH:=}" "${EVAL_FRACTION:=0.01}"
: "${SAVE_INTERVAL:=500}" "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=200}" "${EXTRA_ARGS:=}" "${DRY_RUN:=0}"
: "${PRETRAINED:?set PRETRAINED to the converted checkpoint (tools/convert_hf_to_megatron.py output)}"
: "${TOKENIZER:?set TOKENIZER to the HF model folder or hub name (its tokenizer)}"
: "${SAVE:=${REPO}/checkpoints/${RUN_NAME}}" "${TENSORBOARD_DIR:=${SAVE}/tensorboard}"

for v in NNODES NODE_RANK GPUS_PER_NODE TP PP EP SEQ_LENGTH GLOBAL_BATCH MICRO_BATCH N_CE MASTER_PORT; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
        echo "launch: error: ${v}=${!v} must be a non-negative integer" >&2; exit 1
    fi
done
WORLD=$((NNODES * GPUS_PER_NODE))
if ((NODE_RANK >= NNODES)); then echo "launch: error: NODE_RANK=${NODE_RANK} must be < NNODES=${NNODES}" >&2; exit 1; fi

PLAN_ARGS=(--model "${MODEL}" --world "${WORLD}" --tp "${TP}" --pp "${PP}" --ep "${EP}" --seq "${SEQ_LENGTH}"
           --micro-batch "${MICRO_BATCH}" --global-batch "${GLOBAL_BATCH}" --k-a "${N_CE}")
[[ -e "${PRETRAINED}" ]] && PLAN_ARGS+=(--config "${PRETRAINED}")
[[ "${RECOMPUTE}" == 1 ]] && PLAN_ARGS+=(--recompute)
"${PYTHON}" "${REPO}/launch/plan.py" "${PLAN_ARGS[@]}"   # exits 1 naming the variable if the layout does not divide

DATA_ARGS=(--task "${TASK}")
[[ -n "${DATA_PATH}" ]] && DATA_ARGS=(--data-path "${DATA_PATH}")
PARALLEL_ARGS=(--tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
               --expert-model-parallel-size "${EP}" --use-distributed-optimizer)
((TP > 1)) && PARALLEL_ARGS+=(--sequence-parallel)
RECOMPUTE_ARGS=()
[[ "${RECOMPUTE}" == 1 ]] && RECOMPUTE_ARGS=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)

CMD=(torchrun --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${GPUS_PER_NODE}"
     --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}"
     -m megatron_ce.train
     --pretrained-checkpoint "${PRETRAINED}" --tokenizer-model "${TOKENIZER}"
     "${DATA_ARGS[@]}" --sft-format "${SFT_FORMAT}" --sft-packing "${SFT_PACKING}" --eval-split-fraction "${EVAL_FRACTION}"
     --moe-ce-num-compressed "${N_CE}" --moe-ce-variant "${CE_VARIANT}" --moe-aux-loss-coeff 0
     "${PARALLEL_ARGS[@]}" --moe-token-dispatcher-type "${DISPATCHER}" --moe-grouped-gemm
     --transformer-impl "${TRANSFORMER_IMPL}" --bf16 "${RECOMPUTE_ARGS[@]}"
     --seq-length "${SEQ_LENGTH}" --micro-batch-size "${MICRO_BATCH}" --global-batch-size "${GLOBAL_BATCH}"
     --epochs "${EPOCHS}" --lr "${LR}" --min-lr "${MIN_LR}" --lr-decay-style cosine
     --lr-warmup-fraction "${WARMUP_FRACTION}" --weight-decay "${WEIGHT_DECAY}" --clip-grad "${CLIP_GRAD}"
     --save "${SAVE}" --save-interval "${SAVE_INTERVAL}" --tensorboard-dir "${TENSORBOARD_DIR}"
     --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}")
# shellcheck disable=SC2206
CMD+=(${EXTRA_ARGS})

if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
cd "${REPO}"
exec "${CMD[@]}"
