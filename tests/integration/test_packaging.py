"""A wheel built from the repository works outside it: packaged recipes by name, default DeepSpeed settings.

The wheel is built offline as CI would (``pip wheel --no-deps --no-build-isolation --no-index``: a pure-Python
project needs only the venv's setuptools) from a copy of the source, installed into a throwaway venv that takes
its dependencies from the project venv, and run from an empty folder, so nothing can come from the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures_pretrain import synth_data
from tests.fixtures_source import copy_source_tree

pytestmark = [pytest.mark.timeout(600)]

_RESOLVE = """
import json, orchestration, volta
from orchestration.deepspeed_engine import build_deepspeed_config, deepspeed_config_path
from volta.config import load_config
config = load_config("debug")
print(json.dumps({
    "modules": [volta.__file__, orchestration.__file__],
    "path": str(deepspeed_config_path(config, on_gpu=False)),
    "filled": build_deepspeed_config(config, world_size=2, on_gpu=False),
}))
"""


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the freshly built volta wheel; its dependencies come from the project venv."""
    pytest.importorskip("setuptools", reason="the offline wheel build uses the venv's setuptools")
    root = tmp_path_factory.mktemp("wheel")
    source = copy_source_tree(root / "source")
    pip = [sys.executable, "-m", "pip"]
    offline = ["--no-deps", "--no-index", "-q"]
    _run([*pip, "wheel", *offline, "--no-build-isolation", "-w", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("volta-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", *offline, str(wheel)])
    # A path line in a .pth adds the project venv's packages (torch, ray, ...) but runs none of its .pth hooks,
    # so its editable finder, which maps volta to the repository, stays out.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib]).strip())
    (site / "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out.stdout + out.stderr


def test_installed_wheel_finds_engine_settings_and_recipes_from_any_folder(
    wheel_venv: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = wheel_venv / "bin"
    got = json.loads(_run([str(bin_dir / "python"), "-c", _RESOLVE], elsewhere).splitlines()[-1])
    assert all(Path(m).is_relative_to(wheel_venv) for m in got["modules"]), got["modules"]
    path = Path(got["path"])
    assert path.is_relative_to(wheel_venv) and not path.is_symlink()
    assert path.read_bytes() == (REPO / "deepspeed_configs" / "zero2_cpu.json").read_bytes()
    assert got["filled"]["train_batch_size"] == 8 and got["filled"]["gradient_accumulation_steps"] == 1
    for recipe in (REPO / "configs").glob("*.yaml"):
        shipped = next(wheel_venv.glob(f"lib/python*/site-packages/volta/config/recipes/{recipe.name}"))
        assert shipped.read_bytes() == recipe.read_bytes()
    assert "base: valid" in _run(
        [str(bin_dir / "volta"), "config", "validate", "--config", "base"], elsewhere
    )


def test_installed_pretrain_driver_checks_a_packaged_recipe(
    wheel_venv: Path, synth_data: Path, tmp_path: Path
) -> None:
    sets = {
        "data.train_shards": synth_data / "train",
        "data.val_shards": synth_data / "val",
        "data.tokenizer": synth_data / "tokenizer",
        "storage.path": tmp_path / "runs",
    }
    cmd = [str(wheel_venv / "bin" / "volta-pretrain"), "--config", "debug", "--check"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert "debug: config valid, storage and shards reachable" in _run(cmd, tmp_path)
