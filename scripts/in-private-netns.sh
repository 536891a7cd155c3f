#!/usr/bin/env bash
# Run a command inside a private network namespace that has only loopback, when this machine allows it
# (root and a working `unshare -n`); run it plainly otherwise. Ray binds every interface and moto/MLflow
# servers must never be reachable from outside, so tests and the demo go through here.
set -euo pipefail
if [[ "${VOLTA_NETNS:-}" == "1" ]]; then
  exec "$@"  # already inside
fi
if [[ "$(id -u)" == "0" ]] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  export VOLTA_NETNS=1
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' volta-netns "$@"
fi
echo "in-private-netns: no private network namespace available (need root + unshare); running plainly" >&2
exec "$@"
