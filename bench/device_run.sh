#!/usr/bin/env bash
# One device call (issue 20): kernel v2 A/B and tables, GPU tests of the new modules, end-to-end 13b FP16 vs e3m2.
#   bash bench/device_run.sh OUT_DIR        (on a CUDA machine; each step bounded so the call ends in time)
set -uo pipefail
out=${1:-bench/results}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
timeout 150 python3 bench/kernel_v2.py --quick --blocks 7 --ms 1,8,16 --mid 128 --out "$out" 2>&1 \
    | tee "$out/kernel.log" | grep -E "correctness|WRONG|fp16 |geo-mean|M=128|Error|error" | grep -v "e2m3\|e2m1"
(cd tests && TRITON_INTERPRET=0 timeout 100 python3 -m pytest -q -x -m gpu . 2>&1 | tail -3)
(cd tests && TRITON_INTERPRET=0 timeout 60 python3 -m pytest -q -x test_kernels.py -k "cuda or graph" 2>&1 | tail -2)
timeout 120 python3 -m fp6llm bench --random llama-2-13b --formats fp16,e3m2 --batch 1,8,32 --prompt-len 128 \
    --gen-len 32 --out "$out" 2>&1 | tee "$out/e2e.log" | grep -E "^\|" | tail -8
