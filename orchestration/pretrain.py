"""Pre-training driver: ``ray job submit -- python orchestration/pretrain.py --config configs/base.yaml``.

Validates the config and checks that storage and shards are reachable before touching Ray, then builds a
TorchTrainer (ScalingConfig and RunConfig from the config) and fits it. Every output lands in the run's storage
folder ``storage.path/<run_name>/``: the resolved ``config.yaml`` (written here), checkpoints, ``metrics.jsonl``
and heat maps (workers), and ``final/`` + ``export/``, made here after training from the newest complete
checkpoint. A deterministic failure stops the run at once with one line naming it and the last good checkpoint.
Resubmitting with the same ``ray.run_name`` and ``storage.path`` resumes that run from its newest complete
checkpoint. Exit status 0 only on success.

Output is for people by default: rank 0's progress line every ``train.log_every`` steps, warnings and errors.
Ray Train's controller notes, Ray's connection notes, torch's C++ notes and known-harmless library warnings
(:data:`HARMLESS_WARNINGS`) come back with ``--verbose`` (or ``VOLTA_VERBOSE=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from orchestration.cluster import check_s3_credentials, connect_ray, usage_exit
from volta import failpoints
from volta.config import ConfigError, VoltaConfig, load_config, resolve_local_paths
from volta.run_storage import RunStorage
from volta.training.failures import FAILED, failure_line, read_failure
from volta.training.finalize import finalize_run
from volta.training.run import run_dir

log = logging.getLogger("volta.pretrain")


# glibc malloc settings for the workers. With glibc's defaults a CPU worker's resident memory kept growing with the
# varying tensor shapes of each step (demo model: 3.0 GB after 10 steps and rising), which ran a 24 GB machine out
# of memory with two workers. Fixed thresholds of 1 MiB kept it flat but put ~40 % of the CPU time in page faults
# (every tensor over 1 MiB mapped and unmapped). Fixed 64 MiB thresholds serve tensors from the heap, and the
# loop's malloc_trim every `train.heap_trim_every` steps returns the freed pages (volta.training.heap): ~1.5x the
# demo's samples/s with bounded memory (docs/benchmarks.md, "Demo time"). Values from the environment win.
MALLOC_ENV = {
    key: os.environ.get(key, default)
    for key, default in (
        ("MALLOC_ARENA_MAX", "2"),
        ("MALLOC_MMAP_THRESHOLD_", str(64 << 20)),
        ("MALLOC_TRIM_THRESHOLD_", str(64 << 20)),
    )
}


# Warnings that say nothing a user can act on, silenced in the driver and the workers unless --verbose: the
# category and the start of the message (no ',' or ':', so that PYTHONWARNINGS can carry them to the workers).
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # DeepSpeed's ZeRO-2 gathers through the old name; torch still runs it (DeepSpeed's to change).
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
    # volta.dist's differentiable all-reduce: the replacement is a private torch module (kept until it is public).
    (FutureWarning, "torch.distributed.nn.functional.all_reduce is deprecated"),
)
# Quiet mode for torch's C++ warnings (c10d's "hostname of the client socket cannot be retrieved" per rank).
# Not RAY_BACKEND_LOG_LEVEL: Ray announces that variable with a line of its own in every process.
QUIET_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR"}


def ignore_harmless_warnings() -> None:
    """Silence :data:`HARMLESS_WARNINGS` in this process (matched by category and message start)."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def harmless_warnings_option(existing: str | None = None) -> str:
    """The ``PYTHONWARNINGS`` value that silences :data:`HARMLESS_WARNINGS` in a new process, after ``existing``
    options (the user's, which Python applies first, so the later, more specific ignores win for these)."""
    ours = [f"ignore:{message}:{category.__name__}" for category, message in HARMLESS_WARNINGS]
    return ",".join([existing, *ours] if existing else ours)


def wants_verbose(flag: bool) -> bool:
    """Whether output stays unfiltered: ``--verbose`` or ``VOLTA_VERBOSE=1`` in the environment."""
    return flag or os.environ.get("VOLTA_VERBOSE", "") not in ("", "0")


class PreflightError(Exception):
    """Something the run needs is missing or unreachable; raised before any worker starts."""


def storage_target(config: VoltaConfig) -> tuple[str, Any]:
    """Ray's ``(storage_path, storage_filesystem)`` for ``storage.path``: an absolute local path or S3 via pyarrow."""
    path = config.storage.path
    if not path.startswith("s3://"):
        return str(Path(path).expanduser().resolve()), None
    from pyarrow import fs

    from volta.data.s3 import S3Location

    s3 = S3Location.from_storage(config.storage)
    # The storage's retry policy (pyarrow has no adaptive mode: standard backoff with the same attempts).
    kwargs: dict[str, Any] = {"retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts)}
    if region := s3.region_name(default=None):
        kwargs["region"] = region
    if endpoint := s3.endpoint():
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    # Credentials are not passed: every process resolves them from the standard AWS chain (never pickled or logged).
    return path.removeprefix("s3://").rstrip("/"), fs.S3FileSystem(**kwargs)


def run_storage(config: VoltaConfig) -> RunStorage:
    """The run's durable folder ``storage.path/<run_name>/`` (checkpoints, final model, export, metrics)."""
    from volta.data.s3 import S3Location

    return RunStorage.for_run(
        config.storage.path, config.ray.run_name, S3Location.from_storage(config.storage)
    )


def preflight(config: VoltaConfig) -> None:
    """Check credentials, storage, shards and tokenizer before Ray starts; raise PreflightError with one line."""
    locations = {
        "storage.path": config.storage.path,
        "data.train_shards": config.data.train_shards,
        "data.val_shards": config.data.val_shards,
    }
    if problem := check_s3_credentials(locations):
        raise PreflightError(problem)
    path = config.storage.path
    if path.startswith("s3://"):
        from volta.data.s3 import S3Location, make_s3_client, split_s3_url

        bucket, _ = split_s3_url(path)
        try:
            make_s3_client(replace(S3Location.from_storage(config.storage), max_attempts=2)).head_bucket(
                Bucket=bucket
            )
        except Exception as err:
            raise PreflightError(f"storage.path: cannot reach {path} ({type(err).__name__}: {err})") from None
    else:
        try:
            Path(path).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PreflightError(f"storage.path: cannot create {path} ({err.strerror})") from None
    from volta.data.factory import samples_per_epoch

    try:
        size = samples_per_epoch(config)
    except Exception as err:
        raise PreflightError(f"data.train_shards: {err}") from None
    if size < config.train.global_batch_size:
        raise PreflightError(
            f"data.train_shards: {size} samples, fewer than one global batch ({config.train.global_batch_size})"
        )
    tok = config.tokenizer_name
    if (tok.startswith((".", "/")) or Path(tok).parent != Path(".")) and not Path(tok).exists():
        raise PreflightError(
            f"data.tokenizer: folder {tok} not found (make one with `volta tokenizer train`)"
        )


def build_trainer(config: VoltaConfig, *, verbose: bool = True) -> Any:
    """The Ray TorchTrainer for this config (call ``.fit()``); ``verbose=False`` keeps Ray Train's console output
    to warnings and silences :data:`HARMLESS_WARNINGS` and C++ notes in the workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.worker import train_fn_per_worker

    storage_path, storage_fs = storage_target(config)
    r = config.ray
    resources: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    env = {"DS_ACCELERATOR": "cuda" if r.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false", **MALLOC_ENV}
    forwarded = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "AWS_ENDPOINT_URL", "AWS_REGION")
    for key in (*forwarded, failpoints.ENV, failpoints.DIR_ENV):  # failpoints: the fault-injection tests
        if key in os.environ:
            env[key] = os.environ[key]
    if not verbose:
        env.update({k: os.environ.get(k, v) for k, v in QUIET_ENV.items()})
        env["PYTHONWARNINGS"] = harmless_warnings_option(os.environ.get("PYTHONWARNINGS"))
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=config.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=r.timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]  # mypy sees the Train V1 class
            name=r.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            worker_runtime_env={"env_vars": env},
            # Ray Train's controller notes (resources, worker group, checkpoints) at INFO. Its per-report line in the
            # workers ("Reporting training result N: TrainingReport(...)") comes from a logger outside ray.train
            # (named by its file path in Ray 2.60) that this level does not reach.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        ),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options of the driver."""
    p = argparse.ArgumentParser(
        prog="volta-pretrain", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--config", "-c", required=True, help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--check", action="store_true", help="validate config and preflight only; start nothing")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="keep Ray Train's and Ray's INFO notes and known-harmless warnings (also VOLTA_VERBOSE=1)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, preflight, fit; returns the exit status (0 success, 2 bad config/preflight, 1 training failed)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    verbose = wants_verbose(args.verbose)
    if not verbose:
        ignore_harmless_warnings()
        for key, value in {**QUIET_ENV, "RAY_LOGGER_LEVEL": "warning"}.items():  # read when ray is imported
            os.environ.setdefault(key, value)
    try:
        config = resolve_local_paths(load_config(args.config, args.overrides))
        preflight(config)
    except (ConfigError, PreflightError) as err:
        return usage_exit("volta-pretrain", err)
    if args.check:
        print(f"volta-pretrain: {args.config}: config valid, storage and shards reachable", file=sys.stderr)
        return 0
    storage = run_storage(config)
    previous = read_failure(storage)
    if (
        previous is not None
    ):  # the user resubmitted after fixing the cause: try again from the last checkpoint
        log.warning("the previous submission stopped: %s; trying again", failure_line(previous))
        storage.delete(FAILED)
    storage.put_bytes("config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
    connect_ray(config.ray.address, dashboard=False)
    error: Any = None
    try:
        result = build_trainer(config, verbose=verbose).fit()
        error = getattr(result, "error", None)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    if (record := read_failure(storage)) is not None:
        print(f"volta-pretrain: {failure_line(record)}", file=sys.stderr)
        return 1
    if error is not None:
        last, _ = storage.newest_complete_checkpoint()
        where = storage.url(last) if last else "none"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"volta-pretrain: training failed: {first}; last good checkpoint: {where}", file=sys.stderr)
        return 1
    try:
        outputs = finalize_run(config, storage, run_dir(config))
    except Exception as err:
        print(f"volta-pretrain: export failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    summary = {
        "run_name": config.ray.run_name,
        "storage": storage.url(),
        **outputs,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
    }
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cli() -> None:
    """Console-script entry point (``volta-pretrain``)."""
    raise SystemExit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
