"""Checkpoint loading cannot run code: real DeepSpeed ZeRO-2 engines (2 gloo ranks, fp32 and bf16) and TorchEngine.

A restored engine continues exactly as the saved one; every file DeepSpeed reads while restoring goes through
restricted unpickling; a file replaced by a pickle that would run a shell command is refused with one line on
every rank, before any state is restored, and the command never runs. No Ray.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from tests.integration.test_cluster import _free_port
from volta.errors import CheckpointRejected
from volta.training.engine import TorchEngine
from volta.training.safe_load import load_restricted, refusal

pytestmark = pytest.mark.timeout(300)

PRECISIONS = ("fp32", "bf16")
RUNS_CODE = f"{os.system.__module__}.system"  # what the payload's pickle names: posix.system on Linux
MODEL_STATES = "state/mp_rank_00_model_states.pt"


class _RunsCode:
    """Unpickling this calls ``os.system("touch <marker>")``: the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_payload(path: Path, marker: Path, kind: str) -> None:
    """Replace ``path`` by a malicious file: a torch.save archive (protocol 2 or 4) or a bare pickle."""
    if kind == "bare pickle":
        path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=pickle.HIGHEST_PROTOCOL))
    else:
        torch.save({"module": _RunsCode(marker)}, path, pickle_protocol=4 if kind == "protocol 4" else 2)


def _shard(precision: str, rank: int) -> str:
    return f"state/{'bf16_' if precision == 'bf16' else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# ------------------------------------------------------------------------------------------ DeepSpeed ranks
def _engine(config: Any, seed: int) -> Any:
    import deepspeed

    from orchestration.deepspeed_engine import (
        DeepSpeedEngineAdapter,
        build_deepspeed_config,
        initialize_deepspeed,
    )
    from tests.fixtures_task import VOCAB
    from volta.dist import differentiable_all_reduce_sum
    from volta.task import build_task
    from volta.training.schedule import build_optimizer, build_scheduler

    torch.manual_seed(seed)
    task = build_task(config, VOCAB, all_reduce=differentiable_all_reduce_sum)
    optimizer = build_optimizer(
        task, config.optim, global_batch_size=config.train.global_batch_size, sharded=True
    )
    scheduler = build_scheduler(optimizer, config.optim, total_steps=4, steps_per_epoch=4)
    ds_engine = initialize_deepspeed(
        rank=torch.distributed.get_rank(),
        world_size=2,
        on_gpu=False,
        model=task,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=build_deepspeed_config(config, world_size=2, on_gpu=False),
    )
    return DeepSpeedEngineAdapter(ds_engine, torch.device("cpu"))


def _step(engine: Any, config: Any, seed: int) -> float:
    from tests.fixtures_task import make_batch

    loss = engine.forward(make_batch(config, b=config.train.micro_batch_size, seed=seed))["loss"]
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


def _tampered_loads(engine: Any, ckpt: Path, precision: str, out: Path, rank: int) -> dict[str, Any]:
    """Each case: rank 0 swaps one file for a payload, every rank tries to load, rank 0 puts the file back."""
    import torch.distributed as dist

    cases = {
        "model states": (MODEL_STATES, "torch.save"),
        "optimizer shard of rank 1": (_shard(precision, 1), "torch.save"),
        "bare pickle": (MODEL_STATES, "bare pickle"),
    }
    before = [p.detach().clone() for p in engine.module.parameters()]
    refusals: dict[str, Any] = {}
    for case, (rel, kind) in cases.items():
        target, saved = ckpt / rel, ckpt / f"{rel}.orig"
        marker = out / f"ran-{precision}-{case.replace(' ', '-')}"
        if rank == 0:
            target.rename(saved)
            _write_payload(target, marker, kind)
        dist.barrier()
        try:
            engine.load(ckpt)
            refusals[case] = {"message": None}
        except CheckpointRejected as err:
            refusals[case] = {"message": str(err)}
        refusals[case].update(file=rel, marker=str(marker))
        dist.barrier()
        if rank == 0:
            saved.replace(target)
        dist.barrier()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    return {"refusals": refusals, "state_untouched": unchanged}


def _load_recording_torch_loads(engine: Any, ckpt: Path) -> tuple[dict[str, Any], list[Any]]:
    """``engine.load(ckpt)`` with every ``torch.load`` call's ``weights_only`` argument recorded."""
    weights_only: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    torch.load = spy  # type: ignore[assignment]
    try:
        return engine.load(ckpt), weights_only
    finally:
        torch.load = real_load


def _allow_list_facts(out: Path) -> dict[str, Any]:
    """What the saved checkpoints name beyond torch's safe set, against the allow-list (here, not in pytest's
    process, so that it never imports DeepSpeed)."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from orchestration.safe_checkpoint import DEEPSPEED_ALLOWED, restricted_checkpoint_loads

    universal = SimpleNamespace(load_universal_checkpoint=lambda: True)
    try:
        with restricted_checkpoint_loads(universal, out, "state"):
            universal_refused = False
    except ValueError:
        universal_refused = True

    files = sorted(out.glob("*/state/*.pt"))
    beyond_torch = {g for f in files for g in torch.serialization.get_unsafe_globals_in_checkpoint(f)}
    # fp16's scaler is written on GPUs only: round-trip one here instead.
    scaler = DynamicLossScaler(2.0**16, 1000, 1, 2, False, dtype=torch.float16)
    torch.save({"loss_scaler": scaler}, out / "fp16-shard.pt")
    loaded = load_restricted(out / "fp16-shard.pt", checkpoint=out, allowed=DEEPSPEED_ALLOWED)
    return {
        "files": len(files),
        "beyond_torch": sorted(beyond_torch),
        "allowed": sorted(f"{t.__module__}.{t.__qualname__}" for t in DEEPSPEED_ALLOWED),
        "refused_with_allow_list": [str(f) for f in files if refusal(f, DEEPSPEED_ALLOWED) is not None],
        "fp16_scaler_round_trip": repr(vars(loaded["loss_scaler"])) == repr(vars(scaler)),
        "universal_refused": universal_refused,
    }


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        LOCAL_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        DS_ACCELERATOR="cpu",
    )
    import torch.distributed as dist

    from tests.fixtures_task import tiny_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    try:
        for precision in PRECISIONS:
            config = tiny_config(f"train.precision={precision}", "ray.num_workers=2")
            ckpt = out / precision
            saved = _engine(config, seed=0)
            _step(saved, config, seed=10 + rank)
            saved.save(ckpt, {"step": 1, "precision": precision})
            torch.manual_seed(7)
            losses_saved = [_step(saved, config, seed=20 + rank), _step(saved, config, seed=30 + rank)]

            restored = _engine(config, seed=1)  # other weights: the load must bring everything back
            result = _tampered_loads(restored, ckpt, precision, out, rank)
            client_state, weights_only = _load_recording_torch_loads(restored, ckpt)
            torch.manual_seed(7)
            losses_restored = [
                _step(restored, config, seed=20 + rank),
                _step(restored, config, seed=30 + rank),
            ]
            result.update(
                losses_saved=losses_saved,
                losses_restored=losses_restored,
                client_state=client_state,
                weights_only=weights_only,
                checkpoint_engine_after=type(restored.engine.checkpoint_engine).__name__,
            )
            results[precision] = result
        if rank == 0:
            results["allow_list"] = _allow_list_facts(out)
        (out / f"rank-{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def deepspeed_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Two gloo ranks: save, tampered loads, a spied restore and two more steps, for fp32 and bf16."""
    out = tmp_path_factory.mktemp("ds-ckpt")
    mp.start_processes(_rank, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    return out, [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_restored_engine_continues_exactly_as_the_saved_one(
    deepspeed_ranks: tuple[Path, list[dict[str, Any]]], precision: str
) -> None:
    _, ranks = deepspeed_ranks
    for r in ranks:
        res = r[precision]
        # Module, fp32 master partition, Adam moments and LR schedule all restored: the same two next losses.
        assert res["losses_restored"] == res["losses_saved"]
        assert res["client_state"] == {"step": 1, "precision": precision}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_file_deepspeed_reads_on_restore_is_restricted(
    deepspeed_ranks: tuple[Path, list[dict[str, Any]]], precision: str
) -> None:
    _, ranks = deepspeed_ranks
    for r in ranks:
        calls = r[precision]["weights_only"]
        assert len(calls) >= 2  # the module states and this rank's optimizer shard
        assert all(c is True for c in calls)
        assert r[precision]["checkpoint_engine_after"] == "TorchCheckpointEngine"  # put back after the load


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", ["model states", "optimizer shard of rank 1", "bare pickle"])
def test_tampered_file_is_refused_on_every_rank_before_anything_runs(
    deepspeed_ranks: tuple[Path, list[dict[str, Any]]], precision: str, case: str
) -> None:
    out, ranks = deepspeed_ranks
    ckpt = out / precision
    for r in ranks:
        refused = r[precision]["refusals"][case]
        message = refused["message"]
        assert message is not None and "\n" not in message
        prefix = f"checkpoint {ckpt}: refused: {refused['file']} "
        if case == "bare pickle":
            assert message.startswith(prefix + "is not a torch.save zip archive")
        else:
            assert message == prefix + f"holds {RUNS_CODE} which is not on the allow-list"
        assert not Path(refused["marker"]).exists()
        assert r[precision]["state_untouched"]


def test_allow_list_is_exactly_what_deepspeed_writes(
    deepspeed_ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, ranks = deepspeed_ranks
    facts = ranks[0]["allow_list"]
    assert facts["files"] == 2 * 3  # per precision: module states and two optimizer shards
    dynamic = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"
    assert facts["beyond_torch"] == sorted(
        set(facts["allowed"]) - {dynamic}
    )  # measured: nothing more, nothing less
    assert facts["refused_with_allow_list"] == []
    assert facts["fp16_scaler_round_trip"]
    assert facts["universal_refused"]  # DeepSpeed reads universal checkpoints with unrestricted torch.load


# ------------------------------------------------------------------------------------------ TorchEngine
class _Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"loss": self.lin(x).pow(2).mean()}


def _torch_engine(seed: int) -> TorchEngine:
    torch.manual_seed(seed)
    module = _Square()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return TorchEngine(module, optimizer, scheduler)


def _torch_steps(engine: TorchEngine, n: int) -> list[float]:
    out = []
    for i in range(n):
        loss = engine.forward(torch.full((2, 4), float(i + 1)))["loss"]
        engine.backward(loss)
        engine.step()
        out.append(float(loss.detach()))
    return out


def test_torch_engine_restores_through_restricted_loading(tmp_path: Path) -> None:
    saved = _torch_engine(0)
    _torch_steps(saved, 2)
    saved.save(tmp_path, {"step": 2})
    restored = _torch_engine(1)
    assert restored.load(tmp_path) == {"step": 2}
    assert _torch_steps(restored, 2) == _torch_steps(saved, 2)


@pytest.mark.parametrize("kind", ["torch.save", "protocol 4", "bare pickle"])
def test_torch_engine_refuses_a_tampered_state_file(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "ckpt"
    saved = _torch_engine(0)
    saved.save(ckpt, {"step": 0})
    marker = tmp_path / "ran"
    _write_payload(ckpt / "state.pt", marker, kind)
    engine = _torch_engine(1)
    before = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(CheckpointRejected) as info:
        engine.load(ckpt)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {ckpt}: refused: state.pt ")
    if kind == "torch.save":
        assert message.endswith(f"holds {RUNS_CODE} which is not on the allow-list")
    assert not marker.exists()
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    if kind == "torch.save":  # the payload is live: DeepSpeed's own unrestricted load would have run it
        control = tmp_path / "control.pt"
        shutil.copy(ckpt / "state.pt", control)
        torch.load(control, weights_only=False)
        assert marker.exists()
