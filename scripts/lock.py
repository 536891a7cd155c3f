#!/usr/bin/env python3
"""Generate and check the dependency lock (requirements/*.txt) from pyproject.toml.

`python scripts/lock.py compile` resolves the whole closure of `volta[dev]` with `uv pip compile` (exact
versions, sha256 hashes of every file of each version) for CPython 3.11 on Linux x86_64 and writes two files:

- requirements/lock.txt   everything except the torch build: installed by the dev venv, CI and both images;
- requirements/torch.txt  torch, torchvision and the CUDA runtime PyPI's Linux build of torch pulls in
                          (nvidia-*, cuda-*, triton): installed by the dev venv, CI and the GPU image. The CPU
                          image takes the same torch version's `+cpu` build from the PyTorch CPU index instead.

`python scripts/lock.py entry NAME` prints one package's hashed entry. `python scripts/lock.py check` needs nothing but the standard library: it fails with one line when
pyproject.toml changed since the lock was made (a digest of its dependency tables is stored in the lock) or
when a direct dependency is missing from the lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "lock.txt"
TORCH_LOCK = ROOT / "requirements" / "torch.txt"
# What the lock is resolved for; part of the digest, so changing it asks for a new lock.
TARGET = {"python": "3.11", "platform": "x86_64-manylinux_2_28", "extras": ["dev"]}
INDEX_URL = "https://pypi.org/simple"
TORCH_BUILD = {"torch", "torchvision"}
# Packages that only PyPI's CUDA build of torch needs; a CPU build of the same version needs none of them.
CUDA_RUNTIME = re.compile(r"^(nvidia-.+|cuda-.+|triton)$")
DIGEST_PREFIX = "# pyproject-sha256: "


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"pyproject.toml: cannot read the requirement {requirement!r}")
    return normalize(match.group(1))


def pyproject_digest(project: dict) -> str:
    """sha256 of what the lock is made from: dependencies, extras, requires-python and the target."""
    inputs = {
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {
            k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())
        },
        "requires-python": project.get("requires-python", ""),
        "target": TARGET,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def direct_requirements(project: dict) -> set[str]:
    """Names of every requirement of the project and its extras, self-references (volta[train]) excluded."""
    names = {requirement_name(r) for r in project.get("dependencies", [])}
    for reqs in project.get("optional-dependencies", {}).values():
        names |= {requirement_name(r) for r in reqs}
    names.discard(normalize(project["name"]))
    return names


def split_entries(text: str) -> list[tuple[str, str, set[str]]]:
    """(name, entry text, names it is required by) for each pinned entry of a `uv pip compile` output."""
    entries = []
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", block)
        if not match:
            continue
        vias: set[str] = set()
        for line in block.splitlines():
            comment = line.strip()
            if comment.startswith("#"):
                word = comment.lstrip("#").strip().removeprefix("via").strip()
                if word:
                    vias.add(word)
        entries.append((normalize(match.group(1)), block.rstrip() + "\n", vias))
    return entries


def pinned_versions(path: Path) -> dict[str, str]:
    """name -> exact version of every entry of a lock file."""
    out = {}
    for line in path.read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            out[normalize(match.group(1))] = match.group(2)
    return out


def split_torch_build(resolved: str) -> tuple[list[str], list[str]]:
    """Entries of a resolution split into (everything else, the torch build).

    The torch build is torch, torchvision and the CUDA runtime packages; a CUDA runtime package that anything
    outside the torch build needs is an error, since the CPU image would then miss it.
    """
    entries = split_entries(resolved)
    torch_names = TORCH_BUILD | {name for name, _, _ in entries if CUDA_RUNTIME.match(name)}
    for name, _, vias in entries:
        if name in torch_names and name not in TORCH_BUILD and not vias <= torch_names:
            raise SystemExit(f"lock: {name} is needed by {sorted(vias - torch_names)}, not only by torch")
    shared = [text for name, text, _ in entries if name not in torch_names]
    return shared, [text for name, text, _ in entries if name in torch_names]


def find_uv() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("lock: uv not found: run `make venv` (uv is in the dev extra) or `pip install uv`")


def header(digest: str, what: str) -> str:
    return (
        f"# {what}\n"
        "# Generated by `make lock` (scripts/lock.py, uv pip compile) from pyproject.toml; do not edit.\n"
        f"# Resolved for CPython {TARGET['python']} on {TARGET['platform']}, extras {TARGET['extras']}.\n"
        f"{DIGEST_PREFIX}{digest}\n"
    )


def run_uv_compile(output: Path, upgrade: list[str]) -> str:
    """`uv pip compile` of pyproject.toml into `output`, whose current pins uv keeps where they still fit."""
    command = [
        find_uv(), "pip", "compile", str(PYPROJECT.relative_to(ROOT)),
        *[f"--extra={extra}" for extra in TARGET["extras"]],
        "--generate-hashes", "--no-header", "--annotation-style=split",
        f"--python-version={TARGET['python']}", f"--python-platform={TARGET['platform']}",
        f"--index-url={INDEX_URL}", "--quiet", f"--output-file={output}",
    ]  # fmt: skip
    if upgrade == ["all"]:
        command.append("--upgrade")
    else:
        command += [f"--upgrade-package={name}" for name in upgrade]
    subprocess.run(command, cwd=ROOT, check=True)
    return output.read_text()


def compile_lock(upgrade: list[str]) -> None:
    """Resolve the lock; versions already locked stay unless pyproject.toml or `upgrade` moves them."""
    project = read_project()
    previous = "".join(path.read_text() for path in (LOCK, TORCH_LOCK) if path.exists())
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "resolved.txt"
        output.write_text(previous)
        resolved = run_uv_compile(output, upgrade)
    shared, torch_build = split_torch_build(resolved)
    digest = pyproject_digest(project)
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(
        header(
            digest, "The dependency closure of volta[dev] except the torch build (requirements/torch.txt)."
        )
        + "".join(shared)
    )
    TORCH_LOCK.write_text(
        header(digest, "torch, torchvision and the CUDA runtime of PyPI's Linux build of torch.")
        + "".join(torch_build)
    )
    print(
        f"lock: {len(shared) + len(torch_build)} packages -> {LOCK.relative_to(ROOT)}, {TORCH_LOCK.relative_to(ROOT)}"
    )


def check_lock() -> int:
    project = read_project()
    for path in (LOCK, TORCH_LOCK):
        if not path.exists():
            print(f"lock-check: {path.relative_to(ROOT)} is missing: run `make lock`", file=sys.stderr)
            return 1
        stored = next(
            (
                line[len(DIGEST_PREFIX) :]
                for line in path.read_text().splitlines()
                if line.startswith(DIGEST_PREFIX)
            ),
            None,
        )
        if stored != pyproject_digest(project):
            print(
                f"lock-check: pyproject.toml changed since {path.relative_to(ROOT)} was made: run `make lock`",
                file=sys.stderr,
            )
            return 1
    locked = pinned_versions(LOCK) | pinned_versions(TORCH_LOCK)
    missing = sorted(direct_requirements(project) - set(locked))
    if missing:
        print(
            f"lock-check: pyproject.toml requires {', '.join(missing)}, not in the lock: run `make lock`",
            file=sys.stderr,
        )
        return 1
    return 0


def print_entry(name: str) -> int:
    """Print one package's hashed entry of the lock (how `make venv` installs the locked uv with pip first)."""
    for path in (LOCK, TORCH_LOCK):
        for entry, text, _ in split_entries(path.read_text()):
            if entry == normalize(name):
                print(text, end="")
                return 0
    print(f"lock: {name} is not in the lock", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["compile", "check", "entry"])
    parser.add_argument("name", nargs="?", help="package name (entry)")
    parser.add_argument(
        "--upgrade",
        default="",
        help="compile: comma-separated packages to move to their newest release, or 'all'",
    )
    args = parser.parse_args(argv)
    if args.command == "compile":
        compile_lock([name for name in args.upgrade.split(",") if name])
        return 0
    if args.command == "entry":
        if not args.name:
            parser.error("entry needs a package name")
        return print_entry(args.name)
    return check_lock()


if __name__ == "__main__":
    sys.exit(main())
