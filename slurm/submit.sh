#!/bin/bash
# Queue the whole cohort: one array task per participant of participants.tsv, then the group level once they
# have all succeeded. Extra arguments go to both levels' run.py (e.g. --skip_bids_validator).
#
#   slurm/submit.sh IMAGE.sif BIDS_DIR OUTPUT_DIR [run.py options]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 IMAGE.sif BIDS_DIR OUTPUT_DIR [run.py options]" >&2
    exit 64
fi
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -f "$2/participants.tsv" ]; then
    echo "$2/participants.tsv not found: the array has one task per row of it" >&2
    exit 66
fi
n=$(( $(grep -c . "$2/participants.tsv") - 1 ))
if [ "$n" -lt 1 ]; then
    echo "$2/participants.tsv lists no participant" >&2
    exit 18
fi
array_job=$(sbatch --parsable --array="1-$n" "$here/participant_array.sbatch" "$@")
array_job=${array_job%%;*}
group_job=$(sbatch --parsable --dependency="afterok:$array_job" "$here/group.sbatch" "$@")
echo "participant level: job $array_job ($n tasks); group level: job ${group_job%%;*} (after all succeed)"
