#!/usr/bin/env bash
# The GPU checks of issues 4 and 5, prepared to run on the lent device machine in two calls made back to back
# (a warm machine keeps the git-ignored .devsite/ between calls for ~30 s; a fresh one does not):
#   1. run(command="bash tools/device/run_checks.sh part1", carry=[".devkit/part1"], timeout_s=120)
#   2. run(command="bash tools/device/run_checks.sh checks", carry=[".devkit/part2"], timeout_s=580)
# after `bash tools/device/build_kit.sh` here. Writes to $OUT: env.txt, model.json (forward, saliency and
# test-time passes on CUDA, fp32 vs bf16), train.json (bare step vs the pipeline with batched GPU augmentation:
# issue 5's >= 80 % target), participant.json (the whole participant level with preprocessing on the GPU
# machine: issue 4's <= 15 s target) and checks.log (every step's output, the CUDA test's too). DEVICE=cpu and
# PYTHON=... run it anywhere, as a dry run. `part2` alone installs the second part (group_cohort.sh uses it).
# Ran on an H200 on 2026-12-04: part 1 took 31 s of device time (the machine's start), the checks 153 s; the
# output is in benchmarks/results/h200/.
set -uo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
out="${OUT:-work/device_checks}"
mkdir -p "$out"
install() {
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .devsite "$@"
}
install_part2() {  # exit code 3: part 1 is not here (a fresh machine), 1: the install failed
  if [ ! -d .devsite/SimpleITK ]; then
    echo "SimpleITK is not in .devsite: this is a fresh machine (part 1 ran on one given back); run part 1 again" >&2
    return 3
  fi
  install .devkit/part2/*.whl || return 1
}
case "${1:-}" in
  part1)
    install .devkit/part1/*.whl && echo "part 1 installed in .devsite; run part 2 now, before the machine goes back"
    exit $? ;;
  part2) install_part2; exit $? ;;  # alone: for another script's run (tools/device/group_cohort.sh)
  checks) install_part2 || exit $? ;;
  *) echo "usage: run_checks.sh part1|part2|checks" >&2; exit 64 ;;
esac
export PYTHONPATH="$PWD/.devsite:$PWD" PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME SECONDS COMMAND...: run, log, note a failure and go on
  local name=$1 seconds=$2; shift 2
  echo "=== $name: $*" | tee -a "$out/checks.log"
  timeout "$seconds" "$@" 2>&1 | tee -a "$out/checks.log" | tail -n 40
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code" | tee -a "$out/checks.log"
  [ "$code" -eq 0 ] || failed=1
}
{ nvidia-smi -L 2>&1; nproc; "$python" -c "import torch, SimpleITK, nibabel, nilearn, bids, torchio, deepbet
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
step cuda_test 90 "$python" -m pytest -q -p no:cacheprovider tests/test_infer.py -k cuda -rs
step model 120 "$python" benchmarks/bench_model.py --device "$device" --out "$out/model.json"
step train 150 "$python" benchmarks/bench_train.py --n_cpus "$(nproc)" --out "$out/train.json"
step participant 180 "$python" benchmarks/bench_participant.py --n 4 --n_cpus 4 "$(nproc)" --device "$device" \
  --out "$out/participant.json"
exit $failed
