"""Connecting to or starting Ray (one place for the pre-training and sweep drivers) and their usage exits."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

__all__ = ["check_s3_credentials", "connect_ray", "init_local_ray", "usage_exit"]


def usage_exit(prog: str, err: Exception) -> int:
    """One line on stderr for a problem the user can fix before anything starts (config, preflight); status 2."""
    from volta.config import ConfigError

    kind = "config error: " if isinstance(err, ConfigError) else ""
    print(f"{prog}: {kind}{err}", file=sys.stderr)
    return 2


def check_s3_credentials(locations: Mapping[str, str | Sequence[str] | None]) -> str | None:
    """The one-line problem when a location is on ``s3://`` and the standard AWS chain finds no credentials.

    ``locations`` maps config fields to a path or a list of paths. Returns None when none is on S3 or botocore's
    chain (environment, shared files, web identity, container and instance roles) yields credentials; otherwise a
    line naming the fields and the two ways to provide credentials: keys in the environment (the optional volta-s3
    Secret on Kubernetes) or an IAM role (IRSA on EKS). Credential values are never part of it.
    """
    on_s3 = [
        field
        for field, value in locations.items()
        if any(str(v).startswith("s3://") for v in ([value] if isinstance(value, str) else value or []))
    ]
    if not on_s3:
        return None
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        if botocore.session.get_session().get_credentials() is not None:
            return None
        reason = "no AWS credentials found"
    except BotoCoreError as err:  # e.g. half a key pair, an unknown AWS_PROFILE; botocore never prints values
        reason = f"AWS credentials unusable ({type(err).__name__}: {' '.join(str(err).split())})"
    return (
        f"{', '.join(on_s3)} on s3:// but {reason}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on Kubernetes:"
        " create the volta-s3 Secret) or give the pods an IAM role (on EKS: annotate service account volta with"
        " eks.amazonaws.com/role-arn); see docs/kubernetes.md"
    )


def connect_ray(address: str | None, *, dashboard: bool) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets), else start a local
    one for this driver: with its dashboard on 127.0.0.1 (sweeps need its State API) or without one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    elif dashboard:
        init_local_ray()
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def init_local_ray(num_cpus: int | None = None) -> str:
    """Start a local Ray cluster for a sweep (dashboard on 127.0.0.1) and return its GCS address.

    Ray Train frees an early-stopped trial's workers through the State API, which its actors find by address
    ("auto"); with several Ray clusters on one machine that lookup fails and the workers' CPUs leak. So the GCS
    port is chosen up front and every actor of the job gets ``RAY_ADDRESS`` pointing at this cluster.
    """
    import socket

    import ray
    from ray.util import get_node_ip_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    address = f"{get_node_ip_address()}:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": {"RAY_ADDRESS": address}},
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    actual = str(ray.get_runtime_context().gcs_address)
    if actual != address:
        log.warning("local Ray came up at %s, not %s; early-stopped trials may hold CPUs", actual, address)
    return actual
