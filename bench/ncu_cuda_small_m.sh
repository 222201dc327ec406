#!/usr/bin/env bash
# Where the CUDA small-M kernel (fpx_small_m) spends its time (ncu counters; run on the device): per case N:K:M:SPLIT
# stall reasons per issued instruction, occupancy, active vs elapsed cycles, DRAM / L2 / L1 throughput; then the SASS
# lines with the most stall samples for the first case. A fifth field "mid" profiles the mid-M kernel (fpx_mid_m,
# one row tile, 8 warps) instead; "x" the small-M kernel reading x at compute time.
#   bash bench/ncu_cuda_small_m.sh N:K:M:SPLIT[:mid|x] [...]
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
s=smsp__average_warps_issue_stalled_
metrics="gpu__time_duration.sum,sm__cycles_active.avg,gpc__cycles_elapsed.max,sm__warps_active.avg.pct_of_peak_sustained_active"
metrics+=",dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed"
metrics+=",l1tex__throughput.avg.pct_of_peak_sustained_active,l1tex__t_sector_hit_rate.pct,smsp__inst_executed.sum"
metrics+=",smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__warps_eligible.avg.per_cycle_active"
metrics+=",launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_registers"
for reason in long_scoreboard barrier wait short_scoreboard mio_throttle lg_throttle math_pipe_throttle membar \
              not_selected selected dispatch_stall no_instruction tex_throttle drain imc_miss branch_resolving; do
    metrics+=",${s}${reason}_per_issue_active.ratio"
done
first=1
for case in "$@"; do
    IFS=: read -r n k m split kind <<< "$case"
    name=fpx_small_m extra=()
    [[ ${kind:-} == mid ]] && name=fpx_mid_m extra=(--mid --row-tiles 1 --warps 8)
    [[ ${kind:-} == x ]] && extra=(--no-prefetch-x)
    echo "=== $name ${n}x${k} M=${m} split ${split}"
    ncu --clock-control none --kernel-name "$name" --launch-skip 3 --launch-count 1 --metrics "$metrics" \
        python3 bench/profile_cuda_small_m.py --n "$n" --k "$k" --m "$m" --split "$split" "${extra[@]}" 2>&1 \
        | grep -E "^\s+(gpu__|sm__|gpc__|dram__|smsp__|launch__|lts__|l1tex__)" \
        | sed "s/${s}//; s/_per_issue_active.ratio//" | awk '{print $1, $NF}'
    if [[ $first == 1 ]]; then
        first=0
        ncu --clock-control none --kernel-name "$name" --launch-skip 3 --launch-count 1 --section SourceCounters \
            --page source --csv --print-source sass \
            python3 bench/profile_cuda_small_m.py --n "$n" --k "$k" --m "$m" --split "$split" "${extra[@]}" \
            2>/dev/null \
            | python3 bench/ncu_sass_stalls.py 30
    fi
done
