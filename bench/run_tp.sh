#!/usr/bin/env bash
# Tensor-parallel benchmark on a 2-GPU machine (issue 9): llama-2-70b random weights, batch 1/8/32, prompt 512,
# 128 new tokens; FP16 TP=2, FP6 e3m2 TP=1 (one GPU), FP6 e3m2 TP=2, each its own process (a step cut by the time
# limit loses only its own rows).
#   bash bench/run_tp.sh OUTDIR [SECONDS]      # SECONDS: the whole script's budget (default 1500); MODEL=tiny-llama PROMPT_LEN=64 to try
# Then: python bench/tp_table.py OUTDIR  (one table, tokens/s per GPU).
set -u
out=${1:-bench/results/tp}
budget=${2:-1500}
mkdir -p "$out"
# NVLink multicast stays off in every process (KINDS.md): NCCL, PyTorch symmetric memory, NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
deadline=$(( $(date +%s) + budget ))
common=(--random "${MODEL:-llama-2-70b}" --batch 1,8,32 --prompt-len "${PROMPT_LEN:-512}" --gen-len 128)
step() {  # step NAME CAP COMMAND...: run with the smaller of CAP and the time left, log to OUTDIR/NAME.log
    local name=$1 cap=$2; shift 2
    local left=$(( deadline - $(date +%s) ))
    (( left < 30 )) && { echo "== $name: skipped, ${left}s left"; return 1; }
    (( cap > left )) && cap=$left
    echo "== $name (<= ${cap}s): $*"
    local t0=$(date +%s)
    timeout "$cap" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $(( $(date +%s) - t0 ))s"; tail -n 14 "$out/$name.log"
    return $rc
}
nvidia-smi topo -m > "$out/topology.txt" 2>&1; head -5 "$out/topology.txt"
tp2=(python3 -m torch.distributed.run --nproc-per-node 2 -m fp6llm bench "${common[@]}" --tp 2)
step fp16-tp2 "${CAP1:-400}" "${tp2[@]}" --formats fp16 --out "$out/fp16-tp2" ||
    step fp16-tp2-eager 240 "${tp2[@]}" --formats fp16 --batch 1,8 --no-cuda-graph --out "$out/fp16-tp2-eager"
CUDA_VISIBLE_DEVICES=0 step e3m2-tp1 "${CAP2:-400}" python3 -m fp6llm bench "${common[@]}" --formats e3m2 --out "$out/e3m2-tp1"
step e3m2-tp2 300 "${tp2[@]}" --formats e3m2 --out "$out/e3m2-tp2"
exit 0
