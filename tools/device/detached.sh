#!/usr/bin/env bash
# Run a long device script detached from the call (setsid), so that it goes on between two device calls, and
# wait for it up to WAIT_S seconds; the next call with the same NAME waits again instead of starting it twice.
#   run(command="bash tools/device/detached.sh cohort 560 bash tools/device/group_cohort.sh", ...)
# then, if it printed "still running", at once (the machine goes back after ~30 s idle):
#   run(command="bash tools/device/detached.sh cohort 560", ...)
# Its state is in work/detached/NAME.{log,pid,rc} (git-ignored, kept while the machine is warm; DETACHED_DIR
# moves it). At the end it copies RESULTS (a folder, default work/group_cohort; the starting call's is kept for the
# later ones) into $OUT (the script itself runs without OUT, which each call empties). Exit code: the script's, or
# 75 while it runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
name=$1 wait_s=$2; shift 2
state_dir=${DETACHED_DIR:-work/detached}
state=$state_dir/$name
mkdir -p "$state_dir"
if [ ! -f "$state.rc" ] && ! { [ -f "$state.pid" ] && kill -0 "$(cat "$state.pid")" 2>/dev/null; }; then
  [ $# -gt 0 ] || { echo "detached.sh: $name was never started; give the command" >&2; exit 64; }
  setsid env -u OUT bash -c '"${@:2}"; echo $? > "$1.rc"' _ "$state" "$@" > "$state.log" 2>&1 < /dev/null &
  echo $! > "$state.pid"
  echo "${RESULTS:-work/group_cohort}" > "$state.results"
  echo "started $name (pid $!): $*"
fi
deadline=$((SECONDS + wait_s))
while [ ! -f "$state.rc" ] && [ $SECONDS -lt $deadline ]; do sleep 2; done
tail -n 30 "$state.log"
results=$(cat "$state.results")
if [ -n "${OUT:-}" ] && [ -d "$results" ]; then cp -r "$results"/. "$OUT"/; fi
if [ -f "$state.rc" ]; then exit "$(cat "$state.rc")"; fi
echo "still running: call again with: bash tools/device/detached.sh $name SECONDS"
exit 75
