#!/usr/bin/env bash
# End-to-end runs on the device (issue 5): smoke test, llama-2-13b FP16 vs FP6, llama-2-70b FP6 on one GPU.
#   bash bench/run_e2e.sh OUTDIR
# Each step logs to OUTDIR and a failure does not stop the next step.
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
step() { local name=$1; shift; echo "== $name: $*"; timeout "${STEP_TIMEOUT:-400}" "$@" > "$out/$name.log" 2>&1; echo "   exit $?"; tail -n 25 "$out/$name.log"; }
step smoke python -m fp6llm generate --random tiny-llama --prompt "hello" --max-new-tokens 16 --device cuda
step bench13b python -m fp6llm bench --random llama-2-13b --formats fp16,e3m2,e2m2 --batch 1,8,32,128 \
    --prompt-len 512 --gen-len 128 --out "$out"
step bench70b python -m fp6llm bench --random llama-2-70b --formats e3m2 --batch 1,16 --prompt-len 1024 \
    --gen-len 64 --out "$out/70b"
