#!/usr/bin/env bash
# Where a small-M fpx_gemm launch spends its time (ncu counters; run on the device): stall reasons, occupancy,
# active vs elapsed cycles (ramp and tail), DRAM throughput.   bash bench/ncu_small_m.sh N K CONFIG [CONFIG...]
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
n=$1; k=$2; shift 2
s=smsp__average_warps_issue_stalled_
metrics="gpu__time_duration.sum,sm__cycles_active.avg,gpc__cycles_elapsed.max,sm__warps_active.avg.pct_of_peak_sustained_active"
metrics+=",dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,launch__grid_size"
metrics+=",launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__occupancy_limit_warps"
for reason in long_scoreboard barrier wait short_scoreboard mio_throttle lg_throttle math_pipe_throttle membar \
              not_selected selected dispatch_stall no_instruction; do
    metrics+=",${s}${reason}_per_issue_active.ratio"
done
for config in "$@"; do
    echo "=== ${n}x${k} M=1 config $config"
    ncu --clock-control none --kernel-name regex:fpx_gemm --launch-skip 3 --launch-count 1 --metrics "$metrics" \
        python bench/profile_kernel.py --n "$n" --k "$k" --config "$config" 2>&1 \
        | grep -E "^\s+(gpu__|sm__|gpc__|dram__|smsp__|launch__)" \
        | sed "s/${s}//; s/_per_issue_active.ratio//" | awk '{print $1, $NF}'
done
