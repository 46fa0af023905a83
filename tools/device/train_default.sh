#!/usr/bin/env bash
# A default-model candidate trained on the lent GPU machine: tools/train_default_model.py --device cuda, all four
# phases, with this script's arguments passed on (the scale to try: --n_synthetic, --n_mimic, --epochs, ...).
# Run after part 1 of run_checks.sh, through detached.sh (it can outlast one call):
#   run(command="RESULTS=work/train_default bash tools/device/detached.sh train 560 bash tools/device/train_default.sh
#       --n_synthetic 800", carry=[".devkit/part2"], timeout_s=590)
#   then, if it printed "still running": run(command="bash tools/device/detached.sh train 560")
# Writes work/train_default/ (what detached.sh copies back, as RESULTS says): log.txt and model.tar.gz (model.pt,
# model.json, training logs; the model and the tool's caches are in work/train_default_out/). Judge the candidate
# here with `python benchmarks/evaluate_default_model.py --model DIR/model.pt --out ... --card ...`, by the rule in
# benchmarks/results/model_candidates.md written before it runs. DEVICE=cpu PYTHON=... is a dry run.
set -uo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
out=work/train_default
mkdir -p "$out"
if [ "$device" = cuda ]; then
  bash tools/device/run_checks.sh part2 || exit $?
  export PYTHONPATH="$PWD/.devsite:$PWD"
fi
export PYTHONUNBUFFERED=1
start=$SECONDS
"$python" tools/train_default_model.py --device "$device" --n_threads "$(nproc)" --out work/train_default_out/model \
  --work_dir work/train_default_out/work "$@" > "$out/log.txt" 2>&1
code=$?
echo "=== train_default_model: exit $code after $((SECONDS - start)) s" | tee -a "$out/log.txt"
[ -f work/train_default_out/model/model.pt ] && tar -czf "$out/model.tar.gz" -C work/train_default_out model
exit $code
