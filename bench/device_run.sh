#!/usr/bin/env bash
# The device run (issue 20), one device call per step, each bounded to end inside the tool's 10-minute limit:
#
#   bash bench/device_run.sh STEP OUT_DIR     STEP: check | kernel | tune | tune-mid | tune-more | tail |
#       wgmma | wgmma-more | wgmma-bf16 | row-tiles | check-new | w-ahead | small-w-ahead | tune-small |
#       interleave | wgmma3 | wgmma-large |
#       e2e | e2e-order | e2e-head | e2e-mid | e2e-pdl | host | e2e70 | serve | serve-mixed | all-quick
#   DRY_RUN=1 bash bench/device_run.sh STEP OUT_DIR     the same commands at tiny shapes on a CPU (what can run there)
#
#   check     GPU correctness: the gpu-marked tests (kernels, paged attention, fused decode ops, graphs), then the
#             kernel tests compiled (not interpreted)
#   kernel    bench/kernel_v2.py: CUDA small-M and Triton v2 against cuBLAS, every format, M <= 16 and mid M
#   tune      bench/tune.py, M <= 64: the measured dispatch table for this GPU (OUT_DIR/<gpu>.json: copy it to
#             src/fp6llm/kernels/configs/ and commit it); tune-mid: M = 128..4096 merged into the same file;
#             tune-more: e3m2 BF16 and e2m1 tables of their own (dispatch.table_for)
#   tail      the small-M kernel's fixed costs (sm_90; first GPU run): split-K summed in a cluster and programmatic
#             dependent launch, their GPU tests, then bench/small_m_tail_ab.py at M = 1/8/16 (each shape's table
#             split; against the plain kernel, cuBLAS and the floor); and whether the tensor cores keep BF16
#             subnormal inputs (bench/bf16_subnormal_probe.py: decides a cheaper BF16 de-quantization)
#   wgmma     the wgmma kernel (sm_90): its GPU tests (stops if they fail), then bench/tune.py --wgmma-only for e3m2
#             FP16 at M = 128/256/512, merged into OUT_DIR/<gpu>.json (copy the file in first; tune rewrites it
#             after every shape); wgmma-more: M = 16 (against the small-M and mid-M kernels); wgmma-bf16: the e3m2
#             BF16 table (M = 32/128/512)
#   e2e       fp6llm bench, llama-2-13b FP16 vs e3m2, batch 1/8/32/128, prompt 512 + 128 new tokens;
#             e2e-mid: batch 32/64/128, prompt 128 + 32 new tokens (the wgmma kernel's batches)
#             e2e-pdl: FP16 and e3m2 at batch 1/8/32 with programmatic dependent launch (the default) and with
#             --no-programmatic-launch
#   row-tiles the small-M kernel with two row tiles per warp (row_tiles=2): its GPU test, then small_m_tail_ab.py
#             at M = 1..16 against the plain kernel and x at compute time
#   check-new the GPU tests of what was built without a device (2026-12-04/05): the wgmma kernel's w_ahead, three
#             consumers, interleaved warpgroups, x in the wgmma order (layers, a model's logits, the norm /
#             silu_mul / attention kernels compiled), the small-M weight rings, and quantizing while loading
#             through transformers at the quantized size; run it first, on a cold compile cache it takes minutes.
#             Then, most telling first: small-w-ahead (M = 1 / 8), interleave, tune-small, wgmma3, e2e-order,
#             e2e-head, w-ahead, wgmma-large (about 600 s each; the tool lends ~1800 s a session)
#   w-ahead   the wgmma kernel with 3-4 weight tiles in flight per warp (w_ahead; built 2026-12-04, not yet timed):
#             its GPU tests (stops if they fail), bench/wgmma_w_ahead.py at M = 16/8/32 (the table's launches), then
#             the tuner at M = 8..64 with those launches among the timed ones (into OUT_DIR/<gpu>.json: copy the
#             table in first)
#   small-w-ahead the small-M kernel with 3 or 4 weight tiles in registers per warp (a ring, w_ahead; built
#             2026-12-05, not yet run): its GPU test (stops if it fails), then bench/small_m_tail_ab.py at M = 1 / 8
#             (w2 / w3 / w4, x ahead or not: PDL launches at each shape's table split) and at M = 16 (x at compute
#             time, one or two row tiles per warp); tune-small: the tuner at
#             M = 1 / 8 / 16 with those launches among the timed ones (into OUT_DIR/<gpu>.json: copy the table in)
#   interleave each warpgroup of the wgmma kernel de-quantizing k-step by k-step beside the wgmma of the k-steps
#             before (built in the twelfth session, 2026-12-04, not yet run): its GPU tests (stops if they fail),
#             then bench/wgmma_probe.py --sweep interleave at M = 256/64/128 on three shapes (the A/B)
#   wgmma3    three consumer warpgroups beside the producer (setmaxnreg; built 2026-12-04, not yet run) and the
#             interleaved consumers: after the interleave step's tests, the tuner at M = 128/256/512 (--wgmma-only:
#             the faster of the launches and the table's entry)
#   wgmma-large the tuner at M = 1024 / 4096 (--wgmma-only: the 256-row and producer launches, interleaved or not,
#             against the table's de-quantize + cuBLAS entries; copy the table in first; built 2026-12-04, not
#             yet run)
#   e2e-head  fp6llm bench, llama-3-8b (vocabulary 128256) FP16, e3m2 and e3m2 with lm_head in e2m5
#             (e3m2+head=e2m5, built 2026-12-05), batch 1/8/32
#   e2e-order fp6llm bench, llama-2-13b e3m2 at batch 1/16/32/64 with x written in the wgmma kernel's order by the
#             norms and silu_mul (the default; built 2026-12-04, not yet timed) and with FP6LLM_ORDER_X=0
#   host      where an eager prefill's host time goes (2026-12-04): bench/profile_prefill.py (13b, FP16 and e3m2, batch
#             1 x 128 tokens: wall time against the kernels' time, cProfile) and bench/host_overhead.py (per call);
#             then bench/read_floor.py (a plain read of each shape's bytes against the floor and the small-M kernel)
#   e2e70     fp6llm bench, llama-2-70b e3m2 and FP16 on one GPU, batch 1/8/32
#   serve     bench/serve.py, llama-2-13b FP16 vs e3m2, 1/8/32/64 clients, the server's default settings (run
#             bench/serve_wheels.sh here first and carry .whl); serve-mixed: 8/32 clients, prompts of 64-2048 tokens
#   all-quick the short version of check + kernel + e2e in one call (what 2026-12-01's last call ran)
set -uo pipefail
step=${1:?usage: bash bench/device_run.sh STEP OUT_DIR}
out=${2:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
dry=${DRY_RUN:-0}
if [[ $dry == 1 ]]; then
    model13=tiny-llama model70=tiny-llama model8=tiny-llama fp16=fp32 device=(--device cpu)
    e2e_shape=(--batch 1,4 --prompt-len 32 --gen-len 8) serve_shape=(--clients 1,4 --requests 2 --prompt-len 16
                                                                     --gen-len 8)
    mixed_shape=(--clients 1,4 --requests 2 --prompt-len 8-200 --gen-len 8)
else
    model13=llama-2-13b model70=llama-2-70b model8=llama-3-8b fp16=fp16 device=()
    e2e_shape=(--batch 1,8,32,128 --prompt-len 512 --gen-len 128) serve_shape=()
    mixed_shape=(--clients 8,32 --requests 2 --prompt-len 64-2048 --gen-len 128)
fi
# GPU tests in 8 processes where pytest-xdist is installed (the device image has it): the kernels they compile on a
# cold cache (NVRTC, 2-30 s each) then compile 8 at a time
parallel=()
if [[ $dry != 1 ]] && python3 -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
gpu_only() {  # a step that needs CUDA: said, not run, on a dry run
    if [[ $dry == 1 ]]; then echo "dry run: skipped (needs CUDA): $*"; return 0; fi
    "$@"
}

case $step in
check)
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 400 python3 -m pytest -q -x -m gpu . 2>&1 | tail -5)
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 150 python3 -m pytest -q -x test_kernels.py test_attention.py \
        test_decoder_ops.py 2>&1 | tail -3)
    ;;
kernel)
    gpu_only timeout 560 python3 bench/kernel_v2.py --ms 1,2,4,8,16 --mid 32,64,128,256,512,1024,4096 --fma-shifts \
        --imad-rotate --out "$out" \
        2>&1 | tee "$out/kernel.log" | grep -E "correctness|WRONG|geo-mean|Error|error|dry run"
    ;;
tune)  # small M first, then the mid-M buckets merged into the same table (each half bounded by the call limit)
    gpu_only timeout 560 python3 bench/tune.py --ms 1,2,4,8,16,32,64 --out "$out" 2>&1 | tee "$out/tune.log" \
        | grep -E "^M=|wrote|Error|dry run"
    ;;
tune-mid)
    gpu_only timeout 560 python3 bench/tune.py --ms 128,256,512,1024,4096 --merge --out "$out" 2>&1 \
        | tee "$out/tune-mid.log" | grep -E "^M=|wrote|Error|dry run"
    ;;
tune-more)  # tables of their own for BF16 and a 4-bit format, merged into the same file
    gpu_only timeout 560 python3 bench/tune.py --formats e3m2,e2m1 --dtypes bf16,fp16 --ms 32,128,512 --merge \
        --out "$out" 2>&1 | tee "$out/tune-more.log" | grep -E "^M=|wrote|Error|dry run"
    ;;
tail)
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 120 python3 -m pytest -q -x test_kernels.py \
        -k "cluster_split or pdl or launch_ex" 2>&1 | tail -15) || { echo "tail tests failed: no timing"; exit 1; }
    gpu_only timeout 60 python3 bench/bf16_subnormal_probe.py 2>&1 | tee "$out/bf16-subnormal.log"
    gpu_only timeout 360 python3 bench/small_m_tail_ab.py --out "$out/small-m-tail.json" 2>&1 \
        | tee "$out/small-m-tail.log" | tail -30
    ;;
wgmma)
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 200 python3 -m pytest -q -x test_kernels.py -k "wgmma or graph" \
        2>&1 | tail -3) || { echo "wgmma tests failed: no tuning"; exit 1; }
    gpu_only timeout 500 python3 bench/tune.py --wgmma-only --formats e3m2 --dtypes fp16 --ms 128,256,512 \
        --out "$out" 2>&1 | tee "$out/tune-wgmma-fp16.log" | grep -E "^M=|wrote|Error|dry run"
    ;;
wgmma-more)
    gpu_only timeout 540 python3 bench/tune.py --wgmma-only --formats e3m2 --dtypes fp16 --ms 16 \
        --out "$out" 2>&1 | tee "$out/tune-wgmma-m16.log" | grep -E "^M=|wrote|Error|dry run"
    ;;
wgmma-bf16)
    gpu_only timeout 560 python3 bench/tune.py --wgmma-only --formats e3m2 --dtypes bf16 --ms 32,128,512 \
        --out "$out" 2>&1 | tee "$out/tune-wgmma-bf16.log" | grep -E "^M=|wrote|Error|dry run"
    ;;
e2e-mid)
    timeout 560 python3 -m fp6llm bench --random "$model13" --formats "$fp16,e3m2" --batch 32,64,128 \
        --prompt-len 128 --gen-len 32 "${device[@]}" --out "$out" 2>&1 | tee "$out/e2e-mid.log" \
        | grep -E "^\||wrote|rror" | tail -12
    ;;
row-tiles)  # the small-M kernel with two 16-row tiles per warp sharing each load of x (built 2026-12-03, not yet
            # timed): its GPU test (stops if it fails), then against the plain kernel and x at compute time
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 150 python3 -m pytest -q -x test_kernels.py -k two_row_tiles \
        2>&1 | tail -2) | tee "$out/row-tiles-tests.log"
    grep -q failed "$out/row-tiles-tests.log" && { echo "row-tiles tests failed: no timing"; exit 1; }
    gpu_only timeout 300 python3 bench/small_m_tail_ab.py --ms 1,2,4,8,16 --variants plain,plainx,rt2 \
        --out "$out/row-tiles.json" 2>&1 | tee "$out/row-tiles.log" | tail -45
    ;;
check-new)
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 540 python3 -m pytest -q "${parallel[@]}" test_kernels.py \
        test_attention.py test_decoder_ops.py test_integrations.py -k "weight_tiles or producer or wgmma_order or \
        table_launch or interleave or deeper_weight_rings or peaks_near_the_quantized" 2>&1 | tail -6) \
        | tee "$out/check-new.log"
    ;;
w-ahead)  # within the tool's 10 minutes: tests ~60 s, the A/B ~150 s, the tuner ~80 s per M (saved after each shape)
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 150 python3 -m pytest -q -x "${parallel[@]}" test_kernels.py \
        -k "weight_tiles or producer" 2>&1 | tail -2) | tee "$out/w-ahead-tests.log"
    grep -q failed "$out/w-ahead-tests.log" && { echo "w-ahead tests failed: no timing"; exit 1; }
    gpu_only timeout 200 python3 bench/wgmma_w_ahead.py --ms 16,8,32 --out "$out/w-ahead.json" 2>&1 \
        | tee "$out/w-ahead.log" | tail -28
    gpu_only timeout 220 python3 bench/tune.py --cuda-only --ms 16,8,32,64 --out "$out" 2>&1 \
        | tee "$out/tune-w-ahead.log" | grep -v "^  " | tail -34
    ;;
small-w-ahead)  # within the tool's 10 minutes: tests ~120 s (cold compiles), the A/B (16 cases x 6) ~300 s
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 200 python3 -m pytest -q -x "${parallel[@]}" test_kernels.py \
        -k "deeper_weight_rings" 2>&1 | tail -2) | tee "$out/small-w-ahead-tests.log"
    grep -q failed "$out/small-w-ahead-tests.log" && { echo "small-w-ahead tests failed: no timing"; exit 1; }
    gpu_only timeout 250 python3 bench/small_m_tail_ab.py --ms 1,8 --variants w2,w3,w4,w2x,w3x,w4x \
        --out "$out/small-w-ahead.json" 2>&1 | tee "$out/small-w-ahead.log" | tail -24
    gpu_only timeout 120 python3 bench/small_m_tail_ab.py --ms 16 --variants w2x,w3x,w4x,w2r2,w3r2,w4r2 \
        --out "$out/small-w-ahead-16.json" 2>&1 | tee "$out/small-w-ahead-16.log" | tail -16
    ;;
tune-small)  # the small-M launches with the rings among them, M = 1 / 8 / 16 (~12 s a case; saved after each shape)
    gpu_only timeout 560 python3 bench/tune.py --cuda-only --ms 1,8,16 --out "$out" 2>&1 \
        | tee "$out/tune-small.log" | grep -v "^  " | tail -30
    ;;
interleave)  # within the tool's 10 minutes: tests ~60 s, compiles ~60 s, 12 cases x 16 launches ~300 s
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 150 python3 -m pytest -q -x "${parallel[@]}" test_kernels.py \
        -k "producer or interleave" \
        2>&1 | tail -2) | tee "$out/interleave-tests.log"
    grep -q failed "$out/interleave-tests.log" && { echo "interleave tests failed: no timing"; exit 1; }
    gpu_only timeout 400 python3 bench/wgmma_probe.py --sweep interleave --ms 256,64,128 \
        --shapes 70b-o,13b-down,70b-up --out "$out/interleave.json" 2>&1 | tee "$out/interleave.log" \
        | grep -E "M=|WRONG|rror" | cut -c1-400
    ;;
wgmma3)  # the tests that cover it are the interleave step's (producer): run that step first
    gpu_only timeout 500 python3 bench/tune.py --wgmma-only --ms 128,256,512 --out "$out" 2>&1 \
        | tee "$out/tune-wgmma3.log" | grep -v "^  cuda\|^  mid" | tail -34
    ;;
wgmma-large)
    gpu_only timeout 540 python3 bench/tune.py --cuda-only --wgmma-only --ms 1024,4096 --out "$out" 2>&1 \
        | tee "$out/tune-wgmma-large.log" | grep -v "^  " | tail -20
    ;;
e2e-order)  # the decode step with x written in the wgmma kernel's order (the default) and without (FP6LLM_ORDER_X=0)
    for order in 1 0; do
        FP6LLM_ORDER_X=$order timeout 270 python3 -m fp6llm bench --random "$model13" --formats e3m2 \
            --batch 1,16,32,64 --prompt-len 128 --gen-len 32 "${device[@]}" --out "$out" 2>&1 \
            | tee -a "$out/e2e-order.log" | grep -E "^\||wrote|rror" | tail -6
    done
    ;;
e2e-head)  # lm_head in e2m5 (built 2026-12-05, not yet timed) against a float lm_head, on a large vocabulary
    timeout 540 python3 -m fp6llm bench --random "$model8" --formats "$fp16,e3m2,e3m2+head=e2m5" \
        --batch 1,8,32 --prompt-len 128 --gen-len 32 "${device[@]}" --out "$out" 2>&1 \
        | tee "$out/e2e-head.log" | grep -E "^\||wrote|rror" | tail -12
    ;;
e2e-pdl)  # the decode step with and without programmatic dependent launch of its kernels, one call
    for flag in "" --no-programmatic-launch; do
        timeout 270 python3 -m fp6llm bench --random "$model13" --formats "$fp16,e3m2" --batch 1,8,32 --prompt-len 128 \
            --gen-len 32 $flag "${device[@]}" --out "$out" 2>&1 | tee -a "$out/e2e-pdl.log" \
            | grep -E "^\||wrote|rror|programmatic" | tail -6
    done
    ;;
e2e)
    timeout 560 python3 -m fp6llm bench --random "$model13" --formats "$fp16,e3m2" "${e2e_shape[@]}" "${device[@]}" \
        --out "$out" 2>&1 | tee "$out/e2e.log" | grep -E "^\||wrote|rror" | tail -12
    ;;
host)
    gpu_only timeout 150 python3 bench/profile_prefill.py --model "$model13" --formats "$fp16,e3m2" --batch 1 \
        --prompt-len 128 --reps 5 --top 25 --out "$out/prefill.json" 2>&1 | tee "$out/prefill.log" | grep -E "prefill"
    gpu_only timeout 100 python3 bench/host_overhead.py --out "$out/host-overhead.json" 2>&1 \
        | tee "$out/host-overhead.log" | grep -v "PDL off"
    gpu_only timeout 200 python3 bench/read_floor.py --out "$out/read-floor.json" 2>&1 | tee "$out/read-floor.log"
    ;;
e2e70)
    timeout 560 python3 -m fp6llm bench --random "$model70" --formats "e3m2,$fp16" --batch 1,8,32 --prompt-len 128 \
        --gen-len 32 "${device[@]}" --out "$out" 2>&1 | tee "$out/e2e70.log" | grep -E "^\||wrote|rror" | tail -10
    ;;
serve | serve-mixed)  # the device image lacks fastapi/uvicorn/pydantic: carry .whl/ (bench/serve_wheels.sh makes it)
    if [[ -d .whl && $dry != 1 ]]; then  # (a dry run uses this machine's own packages)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    shape=("${serve_shape[@]}") log=serve
    [[ $step == serve-mixed ]] && shape=("${mixed_shape[@]}") log=serve-mixed
    timeout 560 python3 bench/serve.py --random "$model13" --formats "$fp16,e3m2" --server-defaults "${shape[@]}" \
        "${device[@]}" --out "$out" 2>&1 | tee "$out/$log.log" | grep -E "^\||wrote|rror" | tail -12
    ;;
all-quick)
    gpu_only timeout 150 python3 bench/kernel_v2.py --quick --ms 1,8,16 --mid 128 --fma-shifts --imad-rotate \
        --out "$out" 2>&1 \
        | tee "$out/kernel.log" | grep -E "correctness|WRONG|fp16 |geo-mean|M=128|Error|error|dry run" \
        | grep -v "e2m3\|e2m1"
    (cd tests && TRITON_INTERPRET=0 gpu_only timeout 150 python3 -m pytest -q -x -m gpu . 2>&1 | tail -3)
    timeout 150 python3 -m fp6llm bench --random "$model13" --formats "$fp16,e3m2" --batch 1,8,32 --prompt-len 128 \
        --gen-len 32 "${device[@]}" --out "$out" 2>&1 | tee "$out/e2e.log" | grep -E "^\|" | tail -8
    ;;
*)
    echo "unknown step $step (check | kernel | tune | tune-mid | tune-more | tail | wgmma | wgmma-more |" \
         "wgmma-bf16 | row-tiles | check-new | w-ahead | small-w-ahead | tune-small | interleave | wgmma3 |" \
         "wgmma-large | e2e | e2e-order | e2e-head | e2e-mid | e2e-pdl | host |" \
         "e2e70 | serve | serve-mixed | all-quick)" >&2
    exit 2
    ;;
esac
