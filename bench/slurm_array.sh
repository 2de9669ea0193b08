#!/usr/bin/env bash
# Scale-out over nodes: one Slurm array task per bench case, all writing into one shared results directory
# (records are atomic, config-hash-named files: tasks never collide; --resume skips what is done), then one page.
#
#   sbatch --array=0-$(( $(bash bench/slurm_array.sh --count <bench options>) - 1 )) --gpus=1 \
#          bench/slurm_array.sh <bench options> --results-dir /shared/results
#   python -m quantbench.reports.site /shared/results -o reports/README.md
#
# <bench options>: exactly what `pytest bench/` takes (--method ... --model ... --scheme ... --tasks ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}  # the interpreter that has quantbench
count=0; [[ ${1:-} == --count ]] && { count=1; shift; }
mapfile -t cases < <("$PY" -m pytest bench/test_accuracy.py --collect-only -q -p no:cacheprovider "$@" 2>/dev/null \
                     | grep '::test_' )
if (( count )); then echo "${#cases[@]}"; exit 0; fi
i=${SLURM_ARRAY_TASK_ID:?run under sbatch --array, or set SLURM_ARRAY_TASK_ID}
(( i < ${#cases[@]} )) || { echo "array index $i: only ${#cases[@]} cases" >&2; exit 2; }
echo "case $i of ${#cases[@]}: ${cases[$i]}" >&2
exec "$PY" -m pytest "${cases[$i]}" -q -p no:cacheprovider --resume "$@"
