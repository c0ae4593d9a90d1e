#!/usr/bin/env bash
# Build the CPU and CUDA images of transferkit, tagged with the package version (the tag that
# compiled pipelines name, see transferkit/components/images.py), and push them with --push.
#
#   images/build.sh                 # build both
#   images/build.sh --push          # build and push both
#   REGISTRY=registry.example.com/ml ENGINE=podman images/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."

registry=${REGISTRY:-ghcr.io/transferkit}
engine=${ENGINE:-docker}
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
push=false
for arg in "$@"; do
  case "$arg" in
    --push) push=true ;;
    *) echo "usage: images/build.sh [--push]  (unknown argument: $arg)" >&2; exit 2 ;;
  esac
done

for image in cpu:cpu cuda:cu128; do
  name=${image%%:*}
  variant=${image##*:}
  tag="$registry/transferkit-$name:$version"
  echo "building $tag (torch variant $variant)"
  "$engine" build --file images/Dockerfile --build-arg "TORCH_VARIANT=$variant" --tag "$tag" .
  if "$push"; then
    "$engine" push "$tag"
  fi
done
