"""Checkpoint loading that cannot run code: ``torch.save`` files are rebuilt by torch's restricted unpickler.

A pickle may name any importable callable and have it called while loading, so a writable checkpoint folder is
otherwise a way to run code on every machine that resumes from it. Here a file is first read statically (its
pickle opcodes are listed, nothing is called) and refused when it names anything beyond torch's own
``weights_only`` set (tensors, storages, dtypes, plain containers, ``OrderedDict``) and the caller's explicit
allow-list; only then is it loaded with ``torch.load(weights_only=True)`` under that allow-list, which enforces
the same rule while unpickling. A refusal is one line (:class:`~volta.errors.CheckpointRejected`).
"""

from __future__ import annotations

import pickle
import pickletools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from volta.errors import CheckpointRejected

__all__ = ["check_checkpoint_files", "load_restricted", "refusal"]

# Opcode byte -> name, to say which construct a refused pickle uses (``STACK_GLOBAL``, ``INST``, ...).
_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _unsupported(err: pickle.UnpicklingError) -> str:
    """What a pickle error from torch's opcode reader names: ``pickle opcode STACK_GLOBAL`` or its first line."""
    match = re.search(r"Unsupported operand (\d+)", str(err))
    if match and int(match.group(1)) in _OPCODE_NAMES:
        return f"pickle opcode {_OPCODE_NAMES[int(match.group(1))]}"
    return _first_line(err)


def refusal(file: str | Path, allowed: Sequence[Any] = ()) -> str | None:
    """Why restricted loading refuses ``file`` (``"holds posix.system which is not on the allow-list"``), or None.

    Decided from the pickle's opcodes alone: nothing in the file is imported or called. ``allowed`` are the
    classes and functions beyond torch's own ``weights_only`` set that the file may name. A file that is not a
    ``torch.save`` zip archive (a bare pickle, a legacy-format file) is refused as well.
    """
    with torch.serialization.safe_globals(list(allowed)):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except pickle.UnpicklingError as err:  # an opcode restricted unpickling does not implement
            return f"holds {_unsupported(err)} which is not on the allow-list"
        except OSError:  # a missing or unreadable file is not a refusal
            raise
        except Exception as err:  # not a zip archive, no data.pkl, truncated: refused, never unpickled
            return f"is not a torch.save zip archive ({_first_line(err)})"
    if unsafe:
        return f"holds {sorted(unsafe)[0]} which is not on the allow-list"
    return None


def _rejected(checkpoint: Path, file: Path, reason: str) -> CheckpointRejected:
    shown = file.relative_to(checkpoint) if file.is_relative_to(checkpoint) else file
    return CheckpointRejected(f"checkpoint {checkpoint}: refused: {shown} {reason}")


def check_checkpoint_files(
    checkpoint: str | Path, files: Iterable[str | Path], allowed: Sequence[Any] = ()
) -> None:
    """Raise :class:`~volta.errors.CheckpointRejected` for the first of ``files`` that :func:`refusal` refuses.

    Used before a restore starts, so that a tampered file stops it before any state is touched (and, in a
    data-parallel job where every rank checks every file, on every rank alike).
    """
    root = Path(checkpoint)
    for file in sorted(Path(f) for f in files):
        reason = refusal(file, allowed)
        if reason is not None:
            raise _rejected(root, file, reason)


def load_restricted(
    file: str | Path,
    *,
    checkpoint: str | Path,
    allowed: Sequence[Any] = (),
    map_location: Any = None,
) -> Any:
    """``torch.load(file, weights_only=True)`` with ``allowed`` added to torch's safe set, after :func:`refusal`.

    ``checkpoint`` is the folder the file belongs to (named in the refusal). Raises
    :class:`~volta.errors.CheckpointRejected` with one line when the file is refused (including a file that
    cannot be read as a ``torch.save`` archive), before any of it is unpickled; a missing file raises OSError.
    """
    path, root = Path(file), Path(checkpoint)
    reason = refusal(path, allowed)
    if reason is None:
        try:
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            # The unpickler's own check, should the static one have missed something. torch re-raises with a
            # long explanation and keeps the unpickler's own error as the context.
            reason = f"holds something restricted unpickling refuses ({_first_line(err.__context__ or err)})"
    raise _rejected(root, path, reason)
