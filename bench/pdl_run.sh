#!/usr/bin/env bash
# Programmatic dependent launch of the decode step (kernels/launch.py) on the GPU at hand, one call:
#   bash bench/pdl_run.sh OUT_DIR [BATCHES]
# its GPU tests (a decode with PDL equal to one without, bit for bit; the kernel chains), then llama-2-13b (random
# weights, prompt 128, 32 new tokens) FP16 vs e3m2 at BATCHES (default 1,8,32,64) with PDL (the default) and without
# (--no-programmatic-launch); then the kernel profile of a batch-1 step both ways.
set -uo pipefail
out=${1:?usage: bash bench/pdl_run.sh OUT_DIR [BATCHES]}
batches=${2:-1,8,32,64}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src TRITON_INTERPRET=0
e2e=(bench --random llama-2-13b --formats fp16,e3m2 --batch "$batches" --prompt-len 128 --gen-len 32)
(timeout 240 python3 -m pytest -q -x tests/test_pdl.py 2>&1 | tail -4) > "$out/tests.log"
cat "$out/tests.log"
if ! grep -q " passed" "$out/tests.log" || grep -q "failed\|error" "$out/tests.log"; then echo "PDL tests failed: no timing"; exit 1; fi
timeout 200 python3 -m fp6llm "${e2e[@]}" --out "$out/e2e-on" > "$out/e2e-on.log" 2>&1
timeout 200 python3 -m fp6llm "${e2e[@]}" --no-programmatic-launch --out "$out/e2e-off" > "$out/e2e-off.log" 2>&1
grep -h "^|\|programmatic" "$out"/e2e-on.log "$out"/e2e-off.log | grep -v -- "---" | head -40
timeout 120 python3 bench/profile_decode.py --formats e3m2 --batch 1 --pdl both --graph-only \
    --out "$out/profile-pdl.json" > "$out/profile-pdl.log" 2>&1
grep "step" "$out/profile-pdl.log"
