"""DeepSpeed glue: the engine config filled from the volta config, and the adapter to volta's engine protocol."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from volta.config import VoltaConfig

# The default engine settings are package data, so an installed wheel finds them from any folder; in the repository
# this is a symlink to the top-level deepspeed_configs/, the one copy users read and edit.
CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed_configs"
# Keys that only the volta config may set (one source of truth for batch sizes, clipping, precision, stage).
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config_path(config: VoltaConfig, *, on_gpu: bool) -> Path:
    """The engine-knobs file for this run: ``train.deepspeed_config`` or the default for precision and device."""
    if config.train.deepspeed_config:
        return Path(config.train.deepspeed_config)
    if not on_gpu:
        return CONFIG_DIR / "zero2_cpu.json"
    return CONFIG_DIR / ("zero2_fp16.json" if config.train.precision == "fp16" else "zero2_bf16.json")


def build_deepspeed_config(config: VoltaConfig, *, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """Load the engine-knobs JSON and fill batch sizes, accumulation, clipping, precision and ZeRO stage.

    Raises ValueError when the knobs file sets a batch size itself (the volta config is the only source).
    """
    path = deepspeed_config_path(config, on_gpu=on_gpu)
    ds: dict[str, Any] = json.loads(path.read_text())
    clash = [k for k in _OWNED_KEYS if k in ds]
    if clash:
        raise ValueError(f"{path}: must not set {clash}; batch sizes come from the volta config (train.*)")
    t = config.train
    accum = t.global_batch_size // (world_size * t.micro_batch_size)
    ds["train_batch_size"] = t.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = accum
    ds["gradient_clipping"] = config.optim.grad_clip or 0.0
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    if t.precision == "fp16":
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": True}
    else:
        ds.pop("fp16", None)
    return ds


class DeepSpeedEngineAdapter:
    """Presents a ``deepspeed.DeepSpeedEngine`` through volta's :class:`~volta.training.engine.Engine` protocol."""

    TAG = "state"

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.engine = engine
        self.device = device

    @property
    def module(self) -> nn.Module:
        return self.engine.module  # type: ignore[no-any-return]

    def forward(self, batch: Any) -> Mapping[str, Tensor]:
        if hasattr(batch, "to"):
            batch = batch.to(
                self.device, non_blocking=self.device.type == "cuda"
            )  # pinned batches: async copy
        return self.engine(batch)  # type: ignore[no-any-return]

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def is_gradient_accumulation_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Every rank writes its ZeRO shard (and rank 0 the module) into ``directory``."""
        self.engine.save_checkpoint(str(directory), tag=self.TAG, client_state={"volta_loop": client_state})

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore module, optimizer shards, scheduler and return the loop's client state.

        Files are read by restricted unpickling only (:mod:`orchestration.safe_checkpoint`): a file holding
        anything beyond tensors, plain containers and DeepSpeed's allow-listed types raises
        :class:`~volta.errors.CheckpointRejected` before any of it is unpickled or any state is restored.
        """
        from orchestration.safe_checkpoint import restricted_checkpoint_loads

        with restricted_checkpoint_loads(self.engine, directory, self.TAG):
            path, client_state = self.engine.load_checkpoint(str(directory), tag=self.TAG)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint with tag {self.TAG!r}")
        return dict(client_state["volta_loop"])


# DeepSpeed's CPU communication op (deepspeed/ops/csrc/cpu/comm/shm.cpp) gives every rank of a single-node group a
# 67 MB shared-memory all-reduce buffer named as below, mapped by all the ranks at init, and never unlinks it:
# every CPU run left world_size x 67 MB of RAM-backed files in /dev/shm until reboot (measured: 7.4 GB after a
# day of test runs on the 24 GB CI machine).
CPU_ALLREDUCE_SHM = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def initialize_deepspeed(*, rank: int, world_size: int, on_gpu: bool, **kwargs: Any) -> Any:
    """``deepspeed.initialize(dist_init_required=False, **kwargs)``'s engine. On CPU the shared-memory
    communication op is switched off first (:func:`skip_cpu_shm_comm`) and every rank then removes the name of
    any buffer it still got (:func:`unlink_cpu_allreduce_buffer`, collective)."""
    import deepspeed

    if not on_gpu:
        skip_cpu_shm_comm()
    engine, _, _, _ = deepspeed.initialize(dist_init_required=False, **kwargs)
    if not on_gpu:
        unlink_cpu_allreduce_buffer(rank, world_size)
    return engine


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU communication backend from building and loading its shared-memory op.

    The op serves only ``inference_all_reduce`` (training's collectives go through the torch process group), yet
    DeepSpeed compiles it from C++ the first time a CPU backend starts on a machine (measured: ~40 s of both
    cores of the 2-core demo machine, in every fresh container) and gives each rank a 67 MB buffer. Marked
    incompatible in DeepSpeed's table of compatible ops (``deepspeed.ops.__compatible_ops__``, one dict that
    DeepSpeed reads when its backend starts), the backend starts without it and ``inference_all_reduce`` falls
    back to the process group. Call before ``deepspeed.initialize`` in the process that trains.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def unlink_cpu_allreduce_buffer(rank: int, world_size: int, shm_dir: Path = Path("/dev/shm")) -> bool:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer; True when there was one.

    Call it on every rank after ``deepspeed.initialize`` (collective: a barrier first, so that every peer has
    mapped the buffer; the mappings stay valid after the name is gone, so the shared-memory all-reduce keeps
    working and the memory is freed when the last rank exits, killed or not).
    """
    import torch.distributed as dist

    if world_size > 1 and dist.is_initialized():
        dist.barrier()
    name = CPU_ALLREDUCE_SHM.format(
        uid=os.getuid(),
        addr=os.environ.get("MASTER_ADDR", ""),
        port=os.environ.get("MASTER_PORT", ""),
        rank=rank,
    )
    try:
        (shm_dir / name).unlink()
    except FileNotFoundError:
        return False
    return True
