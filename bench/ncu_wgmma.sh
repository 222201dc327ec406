#!/usr/bin/env bash
# Where a wgmma-kernel launch spends its time (ncu on the device): stall reasons, pipes, shared-memory wavefronts,
# the top stall sites of the SASS.   bash bench/ncu_wgmma.sh N K M N_X [SPLIT [WGS [X_AHEAD [MIN_CTAS [PRODUCER]]]]]
# (PRODUCER 1: the warp-specialized variant)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
n=$1; k=$2; m=$3; n_x=$4; split=${5:-1}; wgs=${6:-2}; x_ahead=${7:-2}; min_ctas=${8:-1}; producer=${9:-0}
run="python bench/profile_cuda_small_m.py --wgmma --n $n --k $k --m $m --n-x $n_x --split $split --wgs $wgs --x-ahead $x_ahead --min-ctas $min_ctas"
[ "$producer" = 1 ] && run+=" --producer"
s=smsp__average_warps_issue_stalled_
metrics="gpu__time_duration.sum,sm__cycles_active.avg,sm__warps_active.avg.pct_of_peak_sustained_active"
metrics+=",dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,launch__grid_size"
metrics+=",launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem"
metrics+=",sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
metrics+=",sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"
metrics+=",l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"
metrics+=",smsp__cycles_active.avg,smsp__issue_active.avg.pct_of_peak_sustained_active"
metrics+=",sm__ctas_launched.max,sm__ctas_launched.min,sm__cycles_active.max,sm__cycles_active.min,launch__waves_per_multiprocessor"
metrics+=",lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__throughput.avg.pct_of_peak_sustained_active"
for reason in long_scoreboard barrier wait short_scoreboard mio_throttle lg_throttle math_pipe_throttle membar \
              not_selected selected dispatch_stall no_instruction sleeping branch_resolving drain tex_throttle; do
    metrics+=",${s}${reason}_per_issue_active.ratio"
done
echo "=== ${n}x${k} M=$m n_x=$n_x split=$split wgs=$wgs x_ahead=$x_ahead min_ctas=$min_ctas producer=$producer"
ncu --clock-control none --kernel-name fpx_wgmma --launch-skip 3 --launch-count 1 --metrics "$metrics" \
    $run 2>&1 | grep -E "^\s+(gpu__|sm__|gpc__|dram__|smsp__|launch__|l1tex__)" \
    | sed "s/${s}//; s/_per_issue_active.ratio//" | awk '{print $1, $(NF)}'
echo "=== speed of light, compute and memory workload"
ncu --clock-control none --kernel-name fpx_wgmma --launch-skip 3 --launch-count 1 --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis $run 2>&1 \
    | grep -v "^==PROF==" | grep -E "^ +[A-Z].* +[0-9.,]+$" | head -60
