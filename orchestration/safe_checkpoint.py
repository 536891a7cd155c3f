"""Restricted loading of DeepSpeed checkpoints: the allow-list of what DeepSpeed pickles, and the scoped loader.

DeepSpeed 0.19 reads every file of a ZeRO-1/2/3 checkpoint through its engine's ``checkpoint_engine.load``
(module states via ``SDLoaderFactory``, optimizer shards in ``_get_all_zero_checkpoint_state_dicts``, MoE expert
files), and its ``TorchCheckpointEngine`` calls ``torch.load(weights_only=False)``: whoever can write the
checkpoint folder runs code on every rank that resumes. :func:`restricted_checkpoint_loads` swaps that
``checkpoint_engine`` for one whose ``load`` is :func:`volta.training.safe_load.load_restricted` for the length of
one ``load_checkpoint`` call, after every ``*.pt`` file of the tag has passed the static check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from volta.training.safe_load import check_checkpoint_files, load_restricted

__all__ = ["DEEPSPEED_ALLOWED", "restricted_checkpoint_loads"]

# What DeepSpeed writes into a checkpoint beyond torch's own weights_only set (tensors, dtypes, torch.Size,
# OrderedDict, plain containers and scalars). Measured on ZeRO-2 CPU checkpoints of the debug task (2 ranks;
# fp32 and bf16; AdamW and LARS): the module-states file needs nothing more (module, lr_scheduler and the
# client state are plain); each ZeRO optimizer shard's ``optimizer_state_dict`` holds the three below.
DEEPSPEED_ALLOWED: tuple[Any, ...] = (
    # ``loss_scaler``: the static scaler of fp32/bf16 runs; its state is two attributes (cur_scale, dynamic).
    LossScaler,
    # ``loss_scaler`` of fp16 runs (GPU only; read from stage_1_and_2.py, not measured here): ints, floats, bools
    # and a torch dtype.
    DynamicLossScaler,
    # ``zero_stage``: an int enum, rebuilt by calling ``ZeroStageEnum(2)``.
    ZeroStageEnum,
    # ``param_slice_mappings``: a dataclass of two ints (numel, start) per parameter fragment of the shard.
    fragment_address,
)


class _RestrictedLoads:
    """A DeepSpeed checkpoint engine whose ``load`` is restricted; everything else goes to the engine's own."""

    def __init__(self, inner: Any, checkpoint: Path) -> None:
        self._inner = inner
        self._checkpoint = checkpoint

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_restricted(
            path, checkpoint=self._checkpoint, allowed=DEEPSPEED_ALLOWED, map_location=map_location
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def restricted_checkpoint_loads(engine: Any, directory: str | Path, tag: str) -> Iterator[None]:
    """Within the block, ``engine.load_checkpoint(directory, tag=tag)`` reads files only by restricted loading.

    On entry every ``*.pt`` file under ``directory/tag`` is checked statically, so a tampered file raises
    :class:`~volta.errors.CheckpointRejected` before any state is restored, on every rank alike (every rank
    reads the whole folder). Raises ValueError for universal checkpoints, which DeepSpeed reads with its own
    unrestricted ``torch.load`` calls. The engine's checkpoint engine is put back on exit.
    """
    if engine.load_universal_checkpoint():
        raise ValueError(
            "DeepSpeed universal checkpoints load through unrestricted torch.load; "
            "volta resumes only from its own ZeRO checkpoints"
        )
    root = Path(directory)
    check_checkpoint_files(root, (root / tag).glob("*.pt"), DEEPSPEED_ALLOWED)
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _RestrictedLoads(original, root)
    try:
        yield
    finally:
        engine.checkpoint_engine = original
