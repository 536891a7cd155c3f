"""Reading a configuration: recipe YAML + ``--set dotted.key=value`` overrides -> one validated :class:`VoltaConfig`.

Loaded once, at the edge (the CLI or the Ray driver), before any cluster work starts; everything below receives
plain values read from it. Errors are one line naming the dotted field path and what was expected.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from volta.config.schema import (
    ConfigError,
    VoltaConfig,
    _FieldError,
    _has_path,
    renamed_key_error,
)

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "exit_on_config_error",
    "load_config",
    "packaged_recipes",
    "recipe_file",
    "resolve_local_paths",
    "set_dotted",
    "total_steps",
]


# ------------------------------------------------------------------------------------------------- loading
def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    ctx_err = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        return f"{ctx_err.path}: {ctx_err.message}"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key (not a volta config field)"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if kind in ("missing",) or isinstance(got, (dict, list)) or got is None:
        return f"{path}: {msg}" if path else msg
    return f"{path}: {msg}, got {got!r}" if path else f"{msg}, got {got!r}"


def config_from_dict(data: Mapping[str, Any]) -> VoltaConfig:
    """Validate a plain mapping into a :class:`VoltaConfig`, raising :class:`ConfigError` with one line."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    loss = data.get("loss")
    for key in loss if isinstance(loss, Mapping) else ():
        if (renamed := renamed_key_error(["loss", str(key)])) is not None:
            raise renamed
    try:
        return VoltaConfig.model_validate(dict(data))
    except ValidationError as err:
        extra = len(err.errors()) - 1
        more = f" (and {extra} more error{'s' if extra > 1 else ''})" if extra > 0 else ""
        raise ConfigError(_format_validation_error(err) + more) from None
    except _FieldError as err:
        raise ConfigError(f"{err.path}: {err.message}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted field path")
    if parts[:2] == ["sweep", "space"] and len(parts) > 2:
        # Sweep spaces are keyed by dotted paths: everything after sweep.space is one key.
        parts = ["sweep", "space", ".".join(parts[2:])]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_dotted(data: dict[str, Any], dotted: str | Sequence[str], value: Any) -> None:
    """Set ``a.b.c = value`` in a nested dict in place, creating the dicts on the way (overrides and sweeps)."""
    parts = dotted.split(".") if isinstance(dotted, str) else list(dotted)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars/lists) to a nested dict in place.

    Each path must name an existing field of the config schema; the value's type is checked by validation.
    """
    schema = VoltaConfig().model_dump()
    for item in overrides:
        parts, value = _parse_override(item)
        if (renamed := renamed_key_error(parts)) is not None:
            raise renamed
        if parts[:2] == ["sweep", "space"] or _has_path(schema, parts) or _under_free_dict(parts):
            set_dotted(data, parts, value)
        else:
            raise ConfigError(f"{'.'.join(parts)}: unknown key (not a volta config field)")
    return data


# Fields whose value is a free-form dict: any key below them can be overridden.
_FREE_DICTS = (("model", "image", "timm_kwargs"), ("model", "text", "config_overrides"))


def _under_free_dict(parts: Sequence[str]) -> bool:
    return any(tuple(parts[: len(p)]) == p and len(parts) > len(p) for p in _FREE_DICTS)


# The recipes shipped in the package, so an installed wheel has them in any folder. In the repository this is a
# symlink to the top-level configs/, the one copy users read and edit.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
_RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped with volta (``base``, ``debug``, ...), each usable as ``--config NAME``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_file(config: str | Path) -> Path:
    """The recipe file that ``config`` names: a path to a YAML file, or the bare name of a packaged recipe.

    A file that exists always wins, so ``--config base`` reads ``./base`` when there is one and the packaged
    ``base.yaml`` otherwise. Raises :class:`ConfigError` naming the packaged recipes when neither exists.
    """
    path = Path(config)
    if path.is_file():
        return path
    if _RECIPE_NAME.fullmatch(str(config)) and (RECIPES_DIR / f"{config}.yaml").is_file():
        return RECIPES_DIR / f"{config}.yaml"
    raise ConfigError(f"{path}: recipe file not found (packaged recipes: {', '.join(packaged_recipes())})")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> VoltaConfig:
    """Load a recipe (a YAML path or a packaged recipe name, see :func:`recipe_file`; the defaults when ``path``
    is None), apply overrides, validate, return the tree."""
    data: dict[str, Any] = {}
    if path is not None:
        p = recipe_file(path)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}:{where} not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections, got {type(loaded).__name__}")
        data = loaded
    return config_from_dict(apply_overrides(data, overrides))


def dump_config(config: VoltaConfig, path: str | Path | None = None) -> str:
    """Serialise the config to YAML (exactly reloadable by :func:`load_config`); write it when ``path`` is given."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def _absolute(path: str, base: Path) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return str(base / path)


def resolve_local_paths(config: VoltaConfig, base: str | Path | None = None) -> VoltaConfig:
    """A copy of ``config`` whose relative local paths are absolute against ``base`` (default: the working directory).

    Ray workers run in their own working directory, so a driver resolves paths once before shipping the config.
    Shard specs, output and storage folders are always local paths or URLs; tokenizer and pretrained-weight values
    are resolved only when they exist locally (otherwise they are hub names).
    """
    root = Path(base or Path.cwd()).resolve()
    data = config.model_dump(mode="json")

    def maybe(value: Any) -> Any:
        return _absolute(value, root) if isinstance(value, str) and (root / value).exists() else value

    for key in ("train_shards", "val_shards"):
        value = data["data"][key]
        if isinstance(value, str):
            data["data"][key] = _absolute(value, root)
        elif isinstance(value, list):
            data["data"][key] = [_absolute(v, root) for v in value]
    data["data"]["tokenizer"] = maybe(data["data"]["tokenizer"])
    data["model"]["image"]["pretrained"] = maybe(data["model"]["image"]["pretrained"])
    data["model"]["text"]["pretrained"] = maybe(data["model"]["text"]["pretrained"])
    data["train"]["output_dir"] = _absolute(data["train"]["output_dir"], root)
    if data["train"]["deepspeed_config"]:
        data["train"]["deepspeed_config"] = _absolute(data["train"]["deepspeed_config"], root)
    data["storage"]["path"] = _absolute(data["storage"]["path"], root)
    return config_from_dict(data)


def exit_on_config_error(err: ConfigError) -> None:
    """Print the one-line error to stderr and exit with status 2 (no traceback)."""
    print(f"volta: config error: {err}", file=sys.stderr)
    raise SystemExit(2)


def total_steps(config: VoltaConfig, samples_per_epoch: int | None) -> int:
    """Optimizer steps of the run: ``train.max_steps`` or ``epochs x samples_per_epoch / global batch``."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    if samples_per_epoch is None:
        raise ConfigError(
            "data.samples_per_epoch: needed to turn train.epochs into steps (or set train.max_steps)"
        )
    assert config.train.epochs is not None
    return max(1, math.ceil(config.train.epochs * samples_per_epoch / config.train.global_batch_size))
