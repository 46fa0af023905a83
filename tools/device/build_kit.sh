#!/usr/bin/env bash
# Fetch, on this machine (pip reaches an index here, not there), the wheels the lent GPU machine needs to run
# bids_fcd: .devkit/part1 (SimpleITK) and .devkit/part2 (the rest), for its Python (default 3.12, x86-64).
#     bash tools/device/build_kit.sh [PYTHON_VERSION]
# Then run_checks.sh, in two device calls (see its header). .devkit/ and .devsite/ are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
python_version="${1:-3.12}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
rm -rf .devkit && mkdir -p .devkit/sdist .devkit/part1 .devkit/part2
# docopt (num2words's need) and neuroCombat are published as source archives only: build their pure-Python
# wheels here
python3 -m pip wheel --quiet --no-deps -w .devkit/sdist docopt==0.6.2 neuroCombat==0.2.12
for part in part1 part2; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --find-links .devkit/sdist \
    --python-version "$python_version" --implementation cp "${platforms[@]}" \
    -d ".devkit/$part" -r "tools/device/requirements-$part.txt"
done
rm -rf .devkit/sdist
du -sh .devkit/part1 .devkit/part2
