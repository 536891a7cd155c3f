#!/usr/bin/env bash
# Build (and with --push, push) the volta images: base images and names from docker/versions.env, Python
# packages from the lock (requirements/*.txt) that the Dockerfiles install.
#   docker/build.sh            GPU image  ${IMAGE_REGISTRY}/volta-gpu:${VOLTA_VERSION}-${CUDA_FLAVOR}
#   docker/build.sh --cpu      CPU image  ${IMAGE_REGISTRY}/volta-cpu:${VOLTA_VERSION}
#   IMAGE_REGISTRY=my.registry/team docker/build.sh --push
# Run from anywhere; the build context is the repository root (filtered by .dockerignore).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
override_registry="${IMAGE_REGISTRY:-}"
# shellcheck source=docker/versions.env
source "$here/versions.env"
IMAGE_REGISTRY="${override_registry:-$IMAGE_REGISTRY}"

flavor=gpu
push=0
for arg in "$@"; do
  case "$arg" in
    --cpu) flavor=cpu ;;
    --push) push=1 ;;
    *) echo "usage: $0 [--cpu] [--push]" >&2; exit 2 ;;
  esac
done

common_args=(--build-arg "UV_IMAGE=$UV_IMAGE")
if [[ $flavor == gpu ]]; then
  tag="$IMAGE_REGISTRY/volta-gpu:$VOLTA_VERSION-$CUDA_FLAVOR"
  docker build -f "$here/Dockerfile" -t "$tag" "${common_args[@]}" \
    --build-arg "CUDA_BASE_IMAGE=$CUDA_BASE_IMAGE" \
    --build-arg "PYTHON_VERSION=$PYTHON_VERSION" \
    "$root"
else
  tag="$IMAGE_REGISTRY/volta-cpu:$VOLTA_VERSION"
  docker build -f "$here/Dockerfile.cpu" -t "$tag" "${common_args[@]}" \
    --build-arg "CPU_BASE_IMAGE=$CPU_BASE_IMAGE" \
    --build-arg "TORCH_CPU_INDEX_URL=$TORCH_CPU_INDEX_URL" \
    "$root"
fi
if [[ $push == 1 ]]; then
  docker push "$tag"
fi
echo "$tag"
