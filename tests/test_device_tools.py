"""tools/device/detached.sh: the lent GPU machine's long runs span two calls, so a second call must wait for the
run the first started, never start it again, and hand back its exit code."""

import os
import subprocess
from pathlib import Path

DETACHED = Path(__file__).resolve().parents[1] / "tools" / "device" / "detached.sh"


def detached(state_dir: Path, wait_s: int, *command: str, **variables: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("OUT", "RESULTS")}
    env.update(DETACHED_DIR=str(state_dir), **variables)
    return subprocess.run(["bash", str(DETACHED), "job", str(wait_s), *command], check=False, env=env,
                          capture_output=True, text=True, timeout=60)


def test_second_call_waits_for_the_first_run_and_returns_its_exit_code(tmp_path):
    marker = tmp_path / "runs.txt"
    script = f"echo run >> {marker}; sleep 3; exit 3"
    first = detached(tmp_path / "state", 0, "bash", "-c", script)
    assert first.returncode == 75 and "still running" in first.stdout
    second = detached(tmp_path / "state", 30, "bash", "-c", script)
    assert second.returncode == 3
    third = detached(tmp_path / "state", 30)
    assert third.returncode == 3
    assert marker.read_text() == "run\n"


def test_later_calls_copy_back_the_results_folder_the_starting_call_named(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    out.mkdir()
    script = f"sleep 2; echo done > {results}/r.txt"
    assert detached(tmp_path / "state", 0, "bash", "-c", script, RESULTS=str(results)).returncode == 75
    finished = detached(tmp_path / "state", 30, OUT=str(out))  # no RESULTS this time
    assert finished.returncode == 0 and (out / "r.txt").read_text() == "done\n"


def test_a_call_without_a_command_for_a_run_never_started_is_a_usage_error(tmp_path):
    result = detached(tmp_path / "state", 5)
    assert result.returncode == 64 and "never started" in result.stderr
