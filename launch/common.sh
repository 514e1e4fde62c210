# Shared body of launch/sft_*_ce.sh (sourced after the model script sets its defaults).
# Validates the layout (launch/plan.py) before torchrun starts, prints the per-GPU memory estimate,
# then runs (or, with DRY_RUN=1, prints) the torchrun command.
# CPU / smoke runs: MODEL_CONFIG (random init from an HF config.json instead of PRETRAINED),
# PRECISION=fp32, GROUPED_GEMM=0, TRANSFORMER_IMPL=local (gloo is picked when there is no GPU).
# GPU-only throughput options follow TRANSFORMER_IMPL (on with transformer_engine, off with local):
#   OVERLAP=1         --overlap-grad-reduce --overlap-param-gather (with --use-distributed-optimizer)
#   PERMUTE_FUSION=1  --moe-permute-fusion (TE's fused token permute; CE_SPLIT=fixed only)
#   FUSIONS=0         passes every --no-*-fusion flag (the trainer enables Megatron's fusions where the
#                     kernels exist; this is the opt-out for debugging)
# KEEP_CHECKPOINTS=N  --keep-last-checkpoints N (0: keep all); CE_LR_MULT=x  --moe-ce-lr-mult x.
# Plan (launch/plan.py): GPU_MEM_GIB (80) for the memory warning, CKPT_WRITE_GBPS (2, aggregate) for the
# save time, SIGTERM_LEAD (SLURM --signal=TERM@ seconds, set by launch/slurm/sft.sbatch) for the grace.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}" "${GPUS_PER_NODE:=8}"
: "${TP:=1}" "${PP:=1}" "${SEQ_LENGTH:=4096}" "${GLOBAL_BATCH:=128}" "${MICRO_BATCH:=1}" "${EPOCHS:=2}"
: "${MIN_LR:=0}" "${WARMUP_FRACTION:=0.03}" "${WEIGHT_DECAY:=0}" "${CLIP_GRAD:=1.0}"
: "${CE_VARIANT:=ia3}" "${DISPATCHER:=alltoall}" "${RECOMPUTE:=0}" "${TRANSFORMER_IMPL:=transformer_engine}"
: "${SFT_FORMAT:=alpaca}" "${SFT_PACKING:=reference}" "${TASK:=math}" "${DATA_PATH:=}" "${EVAL_FRACTION:=0.01}"
: "${SAVE_INTERVAL:=500}" "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=200}" "${EXTRA_ARGS:=}" "${DRY_RUN:=0}"
: "${TRAIN_ITERS:=}" "${PRECISION:=bf16}" "${GROUPED_GEMM:=1}" "${MODEL_CONFIG:=}" "${PRETRAINED:=}"
# A dead or stuck rank makes the others fail after this many minutes instead of torch's 30 (README).
: "${DIST_TIMEOUT_MINUTES:=10}"
# On SIGTERM (preemption) the ranks finish the iteration and save; torchrun waits this long for them.
: "${SHUTDOWN_TIMEOUT:=300}"
: "${KEEP_CHECKPOINTS:=0}" "${CE_LR_MULT:=}" "${CE_SPLIT:=fixed}" "${FUSIONS:=1}" "${SIGTERM_LEAD:=0}"
: "${GPU_MEM_GIB:=80}" "${CKPT_WRITE_GBPS:=2}"
GPU_OPTS=0
[[ "${TRANSFORMER_IMPL}" == transformer_engine ]] && GPU_OPTS=1
: "${OVERLAP:=${GPU_OPTS}}"
PERMUTE_DEFAULT=0
[[ "${GPU_OPTS}" == 1 && "${CE_SPLIT}" == fixed ]] && PERMUTE_DEFAULT=1
: "${PERMUTE_FUSION:=${PERMUTE_DEFAULT}}"
if [[ -z "${PRETRAINED}" && -z "${MODEL_CONFIG}" ]]; then
    echo "launch: error: set PRETRAINED to the converted checkpoint (tools/convert_hf_to_megatron.py output), or MODEL_CONFIG to an HF config.json for a random init" >&2; exit 1
fi
if [[ "${PRECISION}" != bf16 && "${PRECISION}" != fp32 ]]; then
    echo "launch: error: PRECISION=${PRECISION} must be bf16 or fp32" >&2; exit 1
fi
: "${TOKENIZER:?set TOKENIZER to the HF model folder or hub name (its tokenizer)}"
: "${SAVE:=${REPO}/checkpoints/${RUN_NAME}}" "${TENSORBOARD_DIR:=${SAVE}/tensorboard}"

for v in NNODES NODE_RANK GPUS_PER_NODE TP PP EP SEQ_LENGTH GLOBAL_BATCH MICRO_BATCH N_CE MASTER_PORT SHUTDOWN_TIMEOUT \
         KEEP_CHECKPOINTS SIGTERM_LEAD; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
        echo "launch: error: ${v}=${!v} must be a non-negative integer" >&2; exit 1
    fi
done
for v in OVERLAP PERMUTE_FUSION FUSIONS; do
    if [[ "${!v}" != 0 && "${!v}" != 1 ]]; then echo "launch: error: ${v}=${!v} must be 0 or 1" >&2; exit 1; fi
done
for v in GPU_MEM_GIB CKPT_WRITE_GBPS; do
    if ! [[ "${!v}" =~ ^[0-9]*\.?[0-9]+$ ]]; then echo "launch: error: ${v}=${!v} must be a positive number" >&2; exit 1; fi
done
if [[ -n "${CE_LR_MULT}" && ! "${CE_LR_MULT}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
    echo "launch: error: CE_LR_MULT=${CE_LR_MULT} must be a positive number" >&2; exit 1
fi
if [[ "${PERMUTE_FUSION}" == 1 && "${CE_SPLIT}" != fixed ]]; then
    echo "launch: error: PERMUTE_FUSION=1 needs CE_SPLIT=fixed (CE_SPLIT=${CE_SPLIT})" >&2; exit 1
fi
WORLD=$((NNODES * GPUS_PER_NODE))
if ((NODE_RANK >= NNODES)); then echo "launch: error: NODE_RANK=${NODE_RANK} must be < NNODES=${NNODES}" >&2; exit 1; fi

# torchrun has --shutdown-timeout only in recent torch (older ones SIGKILL the ranks 30 s after their
# SIGTERM); ask the torchrun that will run, once.
TORCHRUN_HELP="$(torchrun --help 2>&1 || true)"
HAS_SHUTDOWN_FLAG=0
[[ "${TORCHRUN_HELP}" == *--shutdown-timeout* ]] && HAS_SHUTDOWN_FLAG=1

PLAN_ARGS=(--model "${MODEL}" --world "${WORLD}" --gpus-per-node "${GPUS_PER_NODE}" --tp "${TP}" --pp "${PP}"
           --ep "${EP}" --seq "${SEQ_LENGTH}" --micro-batch "${MICRO_BATCH}" --global-batch "${GLOBAL_BATCH}"
           --k-a "${N_CE}" --ce-variant "${CE_VARIANT}" --transformer-impl "${TRANSFORMER_IMPL}"
           --gpu-mem-gib "${GPU_MEM_GIB}" --ckpt-write-gbps "${CKPT_WRITE_GBPS}" --keep-checkpoints "${KEEP_CHECKPOINTS}"
           --shutdown-timeout "${SHUTDOWN_TIMEOUT}" --torchrun-shutdown-flag "${HAS_SHUTDOWN_FLAG}"
           --signal-lead "${SIGTERM_LEAD}" --dist-timeout-minutes "${DIST_TIMEOUT_MINUTES}")
if [[ -n "${MODEL_CONFIG}" ]]; then PLAN_ARGS+=(--config "${MODEL_CONFIG}")
elif [[ -e "${PRETRAINED}" ]]; then PLAN_ARGS+=(--config "${PRETRAINED}"); fi
[[ "${RECOMPUTE}" == 1 ]] && PLAN_ARGS+=(--recompute)
"${PYTHON}" "${REPO}/launch/plan.py" "${PLAN_ARGS[@]}"   # exits 1 naming the variable if the layout does not divide

DATA_ARGS=(--task "${TASK}")
[[ -n "${DATA_PATH}" ]] && DATA_ARGS=(--data-path "${DATA_PATH}")
PARALLEL_ARGS=(--tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
               --expert-model-parallel-size "${EP}" --use-distributed-optimizer)
((TP > 1)) && PARALLEL_ARGS+=(--sequence-parallel)
[[ "${OVERLAP}" == 1 ]] && PARALLEL_ARGS+=(--overlap-grad-reduce --overlap-param-gather)
MOE_ARGS=(--moe-ce-split "${CE_SPLIT}")
[[ "${PERMUTE_FUSION}" == 1 ]] && MOE_ARGS+=(--moe-permute-fusion)
[[ -n "${CE_LR_MULT}" ]] && MOE_ARGS+=(--moe-ce-lr-mult "${CE_LR_MULT}")
FUSION_ARGS=()
[[ "${FUSIONS}" == 0 ]] && FUSION_ARGS=(--no-bias-swiglu-fusion --no-bias-dropout-fusion --no-masked-softmax-fusion
                                        --no-rope-fusion --no-gradient-accumulation-fusion)
CKPT_ARGS=()
((KEEP_CHECKPOINTS > 0)) && CKPT_ARGS=(--keep-last-checkpoints "${KEEP_CHECKPOINTS}")
LAUNCH_ARGS=()
[[ "${HAS_SHUTDOWN_FLAG}" == 1 ]] && LAUNCH_ARGS=(--shutdown-timeout "${SHUTDOWN_TIMEOUT}")
LENGTH_ARGS=(--epochs "${EPOCHS}")
[[ -n "${TRAIN_ITERS}" ]] && LENGTH_ARGS=(--train-iters "${TRAIN_ITERS}")
MODEL_ARGS=(--pretrained-checkpoint "${PRETRAINED}")
[[ -n "${MODEL_CONFIG}" ]] && MODEL_ARGS=(--model-config "${MODEL_CONFIG}")
PRECISION_ARGS=()
[[ "${PRECISION}" == bf16 ]] && PRECISION_ARGS+=(--bf16)
[[ "${GROUPED_GEMM}" == 1 ]] && PRECISION_ARGS+=(--moe-grouped-gemm)
RECOMPUTE_ARGS=()
[[ "${RECOMPUTE}" == 1 ]] && RECOMPUTE_ARGS=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)

CMD=(torchrun --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${GPUS_PER_NODE}"
     --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" "${LAUNCH_ARGS[@]}"
     -m megatron_ce.train
     "${MODEL_ARGS[@]}" --tokenizer-model "${TOKENIZER}"
     "${DATA_ARGS[@]}" --sft-format "${SFT_FORMAT}" --sft-packing "${SFT_PACKING}" --eval-split-fraction "${EVAL_FRACTION}"
     --moe-ce-num-compressed "${N_CE}" --moe-ce-variant "${CE_VARIANT}" --moe-aux-loss-coeff 0 "${MOE_ARGS[@]}"
     "${PARALLEL_ARGS[@]}" --moe-token-dispatcher-type "${DISPATCHER}"
     --transformer-impl "${TRANSFORMER_IMPL}" "${PRECISION_ARGS[@]}" "${RECOMPUTE_ARGS[@]}" "${FUSION_ARGS[@]}"
     --seq-length "${SEQ_LENGTH}" --micro-batch-size "${MICRO_BATCH}" --global-batch-size "${GLOBAL_BATCH}"
     "${LENGTH_ARGS[@]}" --lr "${LR}" --min-lr "${MIN_LR}" --lr-decay-style cosine
     --lr-warmup-fraction "${WARMUP_FRACTION}" --weight-decay "${WEIGHT_DECAY}" --clip-grad "${CLIP_GRAD}"
     --save "${SAVE}" --save-interval "${SAVE_INTERVAL}" "${CKPT_ARGS[@]}" --tensorboard-dir "${TENSORBOARD_DIR}"
     --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}"
     --distributed-timeout-minutes "${DIST_TIMEOUT_MINUTES}" --exit-signal-handler)
# shellcheck disable=SC2206
CMD+=(${EXTRA_ARGS})

if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
cd "${REPO}"
# Not exec: a SIGTERM/SIGINT sent to this script goes to the ranks themselves (torchrun's children), which
# finish the iteration, save and exit 0, so torchrun exits 0 too; and a failure is named in one line.
"${CMD[@]}" &
CHILD=$!
trap 'pkill -TERM -P "${CHILD}" 2>/dev/null || kill -TERM "${CHILD}" 2>/dev/null' TERM INT
while :; do
    wait "${CHILD}" && RC=0 || RC=$?
    kill -0 "${CHILD}" 2>/dev/null || break  # wait returned for a trapped signal: torchrun still runs
done
if ((RC != 0)); then
    echo "launch: error: torchrun exited ${RC} on node ${NODE_RANK}/${NNODES}; its 'Root Cause' above names the first rank that failed here (a rank on another node may have failed first)" >&2
fi
exit "${RC}"
