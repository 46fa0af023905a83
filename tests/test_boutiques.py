"""The Boutiques descriptor (what CBRAIN imports): valid, and the same command line as run.py's parser."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_fcd import cli, exit_codes

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR_PATH = REPO / "boutiques" / "bids_fcd.json"
DESCRIPTOR = json.loads(DESCRIPTOR_PATH.read_text())
INPUTS = {i["id"]: i for i in DESCRIPTOR["inputs"]}
BY_FLAG = {i["command-line-flag"]: i for i in DESCRIPTOR["inputs"] if "command-line-flag" in i}
POSITIONAL_KEYS = {"bids_dir": "[BIDS_DIR]", "output_dir": "[OUTPUT_DIR]", "analysis_level": "[ANALYSIS_LEVEL]"}
# Options that print and exit instead of configuring a run: not inputs of a task.
INFORMATION_ACTIONS = (argparse._HelpAction, argparse._VersionAction)


def bosh() -> str:
    found = shutil.which("bosh", path=f"{Path(sys.executable).parent}:{shutil.os.environ.get('PATH', '')}")
    assert found, "bosh missing: pip install -e '.[test]' (boutiques)"
    return found


def parser_options() -> dict[str, argparse.Action]:
    return {action.option_strings[-1]: action for action in cli.build_parser()._actions
            if action.option_strings and not isinstance(action, INFORMATION_ACTIONS)}


def expected_input(action: argparse.Action) -> dict:
    """The Boutiques fields that an argparse option fixes (names and descriptions are free)."""
    flag = action.option_strings[-1]
    expected = {"command-line-flag": flag, "value-key": f"[{action.dest.upper()}]", "optional": True}
    if isinstance(action, argparse._StoreTrueAction):
        expected["type"] = "Flag"
        return expected
    if action.type in (int, cli.positive_int, cli.fold_count, cli.seed_int):
        expected.update({"type": "Number", "integer": True})
        if action.type is cli.positive_int:
            expected["minimum"] = 1
        if action.type is cli.fold_count:
            expected["minimum"] = 2
        if action.type is cli.seed_int:
            expected.update({"minimum": 0, "maximum": 2**32 - 1})
    elif action.type is float:
        expected["type"] = "Number"
    elif action.type is cli.fraction:
        expected.update({"type": "Number", "minimum": 0, "maximum": 1})
    elif action.type is not Path:
        expected["type"] = "String"
    if action.nargs in ("+", "*"):
        expected["list"] = True
    if action.choices:
        expected["value-choices"] = list(action.choices)
    if action.default is not None:
        expected["default-value"] = action.default
    return expected


@pytest.mark.parametrize("extra", [[], ["--bids"]], ids=["schema", "bids-app-template"])
def test_descriptor_passes_bosh_validate(extra):
    result = subprocess.run([bosh(), "validate", *extra, str(DESCRIPTOR_PATH)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_parser_option_is_an_input_with_the_same_flag_and_vice_versa():
    options = parser_options()
    missing = {flag: expected_input(action) for flag, action in options.items() if flag not in BY_FLAG}
    assert not missing, "add to boutiques/bids_fcd.json (with an id, name, description):\n" + json.dumps(
        list(missing.values()), indent=2)
    extra = sorted(set(BY_FLAG) - set(options))
    assert not extra, f"the descriptor has flags run.py does not know: {extra}"


@pytest.mark.parametrize("flag", sorted(parser_options()))
def test_input_type_list_choices_and_default_match_the_parser(flag):
    action = parser_options()[flag]
    described = BY_FLAG[flag]
    for key, value in expected_input(action).items():
        assert described.get(key) == value, f"{flag}: {key} is {described.get(key)!r}, the parser says {value!r}"
    if action.type is Path:
        assert described["type"] in ("File", "String")
    for key in ("integer", "minimum", "maximum", "list", "value-choices", "default-value"):
        if key not in expected_input(action):
            assert key not in described or (key == "integer" and described[key] is False), f"{flag}: stray {key}"


def test_positional_arguments_come_first_in_bids_app_order():
    command = DESCRIPTOR["command-line"]
    assert command.startswith("mkdir -p [OUTPUT_DIR]; /run.py [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] ")
    positionals = [a.dest for a in cli.build_parser()._actions if not a.option_strings]
    assert positionals == list(POSITIONAL_KEYS)
    assert INPUTS["bids_dir"]["type"] == "File" and not INPUTS["bids_dir"]["optional"]
    assert INPUTS["analysis_level"]["value-choices"] == list(cli.ANALYSIS_LEVELS)
    assert {i["type"] for i in DESCRIPTOR["inputs"] if i["value-key"] == "[OUTPUT_DIR]"} == {"File", "String"}
    value_keys = {i["value-key"] for i in DESCRIPTOR["inputs"]}
    for key in value_keys:
        assert command.count(key) == (2 if key == "[OUTPUT_DIR]" else 1), key


def test_error_codes_are_exactly_the_contract_codes():
    contract = {value for name, value in vars(exit_codes).items() if name.startswith("EXIT_") and value != 0}
    assert {e["code"] for e in DESCRIPTOR["error-codes"]} == contract
    assert len(DESCRIPTOR["error-codes"]) == len(contract)


def test_versions_image_and_resources():
    version = (REPO / "version").read_text().strip()
    assert DESCRIPTOR["tool-version"] == version
    image = DESCRIPTOR["container-image"]
    assert image["type"] == "docker" and image["image"].endswith(f":{version}")
    resources = DESCRIPTOR["suggested-resources"]
    assert resources["gpu"] >= 1 and resources["cpu-cores"] >= 1 and resources["ram"] > 0


def test_a_simulated_invocation_parses_back_to_the_same_values(tmp_path, monkeypatch):
    """`bosh exec simulate` renders the command CBRAIN would run; run.py's parser must read it back."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bids").mkdir()
    (tmp_path / "filter.json").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"")
    invocation = {
        "bids_dir": "bids", "output_dir_name": "out", "analysis_level": "group",
        "participant_label": ["01", "sub-02"], "session_label": ["pre"], "bids_filter_file": "filter.json",
        "skip_bids_validator": True, "model": "model.pt", "device": "cuda", "n_cpus": 3, "work_dir": "scratch",
        "seed": 7, "n_passes": 2, "label_column": "diagnosis", "positive_label": "patient", "n_folds": 3,
        "epochs": 2, "batch_size": 8, "learning_rate": 0.01, "architecture": "resnet3d_18",
        "arch_params": '{"width": 0.5}', "grid_spacing_mm": 3.0, "grid_shape": "48x64x48", "from_scratch": True,
        "pretrain_epochs": 2, "final_model": "fold_ensemble", "grad_accum_steps": 2, "patience": 5,
        "mixed_precision": "bf16", "augmentation": "gpu", "deterministic": True, "embedding": "tsne",
    }
    (tmp_path / "invocation.json").write_text(json.dumps(invocation))
    result = subprocess.run([bosh(), "exec", "simulate", "-i", "invocation.json", str(DESCRIPTOR_PATH)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    command = result.stdout.split("Generated Command:")[-1].strip().splitlines()[0]
    prefix, _, run = command.partition("; ")
    assert prefix == "mkdir -p out"
    words = shlex.split(run)
    assert words[0] == "/run.py"
    args = cli.build_parser().parse_args(words[1:])
    assert (args.bids_dir, args.output_dir, args.analysis_level) == (Path("bids"), Path("out"), "group")
    for key, value in invocation.items():
        if key in INPUTS and INPUTS[key].get("command-line-flag"):
            parsed = getattr(args, key)
            assert (str(parsed) if isinstance(parsed, Path) else parsed) == value, key
    every_option = set(parser_options())
    assert {w for w in words if w.startswith("--")} == every_option, "the invocation does not cover every option"
