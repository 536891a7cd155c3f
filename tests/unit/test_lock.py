"""The dependency lock: `make lock-check` catches a stale lock, and installs follow the lock, not the index."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures_deploy import LOCK_TOOL, load_lock_tool

lock_tool = load_lock_tool()


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    # -I -S: no site-packages and no environment, as on a machine without the venv.
    return subprocess.run(
        [sys.executable, "-I", "-S", str(root / "scripts" / "lock.py"), "check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """pyproject.toml, the lock and the lock tool in a scratch folder laid out like the repository."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(LOCK_TOOL, tmp_path / "scripts" / "lock.py")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    return tmp_path


def test_the_committed_lock_matches_pyproject_using_the_standard_library_only() -> None:
    result = run_check(REPO)
    assert result.returncode == 0, result.stderr


def test_a_changed_dependency_table_is_one_line_asking_for_make_lock(project_copy: Path) -> None:
    pyproject = project_copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"timm>=1.0.9",', '"timm>=1.0.9",\n  "rich>=13",'))
    result = run_check(project_copy)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pyproject.toml changed" in lines[0] and "make lock" in lines[0], lines


def test_a_requirement_missing_from_the_lock_is_named(project_copy: Path) -> None:
    lock = project_copy / "requirements" / "lock.txt"
    # Drop POT's entry, keep the digest: the lock no longer covers a direct requirement.
    lock.write_text(re.sub(r"\npot==[^\n]*(\n    [^\n]*)*", "", lock.read_text()))
    result = run_check(project_copy)
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "lock-check: pyproject.toml requires pot, not in the lock: run `make lock`"
    )


def test_the_cpu_image_never_misses_a_package_the_cuda_build_shares() -> None:
    resolved = (
        "torch==2.0 \\\n    --hash=sha256:aa\n    # via volta (pyproject.toml)\n"
        "nvidia-nccl==2.0 \\\n    --hash=sha256:bb\n    # via torch\n"
        "triton==3.0 \\\n    --hash=sha256:cc\n    # via torch\n"
        "sympy==1.0 \\\n    --hash=sha256:dd\n    # via torch\n"
    )
    shared, torch_build = lock_tool.split_torch_build(resolved)
    assert [e.split("==")[0] for e in shared] == ["sympy"]
    assert [e.split("==")[0] for e in torch_build] == ["torch", "nvidia-nccl", "triton"]
    needed_elsewhere = resolved.replace(
        "    # via torch\ntriton", "    # via\n    #   deepspeed\n    #   torch\ntriton"
    )
    with pytest.raises(SystemExit, match="nvidia-nccl is needed by \\['deepspeed'\\]"):
        lock_tool.split_torch_build(needed_elsewhere)


def write_wheel(folder: Path, version: str) -> Path:
    """A minimal pure-Python wheel of the package `volta-lock-probe`."""
    path = folder / f"volta_lock_probe-{version}-py3-none-any.whl"
    files = {
        "volta_lock_probe/__init__.py": f"VERSION = {version!r}\n",
        f"volta_lock_probe-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: volta-lock-probe\nVersion: {version}\n"
        ),
        f"volta_lock_probe-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = f"volta_lock_probe-{version}.dist-info/RECORD"
    lines = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(text.encode())}")
    files[record] = "\n".join([*lines, f"{record},,"]) + "\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def pip_install_locked(lock: Path, index: Path, target: Path) -> subprocess.CompletedProcess[str]:
    """The Makefile's hash-checked install flags, with a local folder as the only index."""
    flags = re.search(r"^HASHED := (.*)$", (REPO / "Makefile").read_text(), re.M)
    assert flags, "Makefile: HASHED flags not found"
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "-q",
         *flags.group(1).split(), "--no-index", "--find-links", str(index), "--target", str(target),
         "-r", str(lock)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_lock_not_the_newest_release_decides_what_is_installed(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.mkdir()
    old = write_wheel(index, "1.0")
    write_wheel(index, "2.0")  # the registry's newest release
    digest = hashlib.sha256(old.read_bytes()).hexdigest()
    lock = tmp_path / "lock.txt"
    lock.write_text(f"volta-lock-probe==1.0 \\\n    --hash=sha256:{digest}\n")
    result = pip_install_locked(lock, index, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "volta_lock_probe" / "__init__.py").read_text() == "VERSION = '1.0'\n"

    # The same version with other bytes (a re-uploaded or tampered file) is refused.
    lock.write_text(f"volta-lock-probe==1.0 \\\n    --hash=sha256:{'0' * 64}\n")
    refused = pip_install_locked(lock, index, tmp_path / "site2")
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stderr
