"""Pre-training driver: ``ray job submit -- python orchestration/pretrain.py --config configs/base.yaml``.

Validates the config and checks that storage and shards are reachable before touching Ray, then builds a
TorchTrainer (ScalingConfig and RunConfig from the config) and fits it. Resubmitting with the same
``ray.run_name`` and ``storage.path`` resumes that run from its latest checkpoint. Exit status 0 only on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestration.cluster import connect_ray, usage_exit
from volta.config import ConfigError, VoltaConfig, load_config, resolve_local_paths

log = logging.getLogger("volta.pretrain")


# glibc malloc settings for the workers: with its defaults a CPU worker's resident memory kept growing with the
# varying tensor shapes of each step (measured on the demo model: 3.0 GB after 10 steps and rising, versus a flat
# 1.5 GB with these), which ran a 24 GB machine out of memory with two workers. Values from the environment win.
MALLOC_ENV = {
    key: os.environ.get(key, default)
    for key, default in (
        ("MALLOC_ARENA_MAX", "2"),
        ("MALLOC_MMAP_THRESHOLD_", "1048576"),
        ("MALLOC_TRIM_THRESHOLD_", "1048576"),
    )
}


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


def preflight(config: VoltaConfig) -> None:
    """Check storage, shards and tokenizer before Ray starts; raise PreflightError with one line naming the field."""
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


def build_trainer(config: VoltaConfig) -> Any:
    """The Ray TorchTrainer for this config (call ``.fit()``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.worker import train_fn_per_worker

    storage_path, storage_fs = storage_target(config)
    r = config.ray
    resources: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    env = {"DS_ACCELERATOR": "cuda" if r.use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false", **MALLOC_ENV}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "AWS_ENDPOINT_URL", "AWS_REGION"):
        if key in os.environ:
            env[key] = os.environ[key]
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
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, preflight, fit; returns the exit status (0 success, 2 bad config/preflight, 1 training failed)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = resolve_local_paths(load_config(args.config, args.overrides))
        preflight(config)
    except (ConfigError, PreflightError) as err:
        return usage_exit("volta-pretrain", err)
    if args.check:
        print(f"volta-pretrain: {args.config}: config valid, storage and shards reachable", file=sys.stderr)
        return 0
    connect_ray(config.ray.address, dashboard=False)
    try:
        result = build_trainer(config).fit()
    except Exception as err:
        print(f"volta-pretrain: training failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    error = getattr(result, "error", None)
    if error is not None:
        print(f"volta-pretrain: training failed: {error}", file=sys.stderr)
        return 1
    summary = {
        "run_name": config.ray.run_name,
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
    }
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cli() -> None:
    """Console-script entry point (``volta-pretrain``)."""
    raise SystemExit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
