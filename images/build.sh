#!/usr/bin/env bash
# Build the CPU and CUDA images of transferkit, tagged with the package version (the tag that
# compiled pipelines name, see transferkit/containers.py), and push them with --push.
#
#   images/build.sh                 # build both
#   images/build.sh cpu             # only the CPU image (cuda: only the CUDA one)
#   images/build.sh --base cpu      # on a bookworm base made here by images/base.sh where none
#                                   # is yet (for machines that reach no image registry)
#   images/build.sh --push          # build and push both
#   REGISTRY=registry.example.com/ml ENGINE=podman BASE_IMAGE=python:3.11-slim-bookworm images/build.sh
#
# First the wheelhouse (images/wheelhouse, git-ignored) is resolved here, on the host, with
# pip and its cache: torch==$TORCH_VERSION (a CPU build: from pip's find-links or TORCH_INDEX,
# e.g. https://download.pytorch.org/whl/cpu), the transferkit wheel, and every dependency at
# its version in constraints.txt. The image build then installs from it with --no-index. The
# CUDA image takes its torch from PyTorch's cu128 index instead (TORCH_SOURCE=index), which
# needs a builder that reaches download.pytorch.org.
#
#   ENGINE      docker, podman or buildah (default: see images/engine.sh)
#   BASE_IMAGE  the base of both stages (default python:3.11-slim-bookworm)
#   PYTHON      the Python 3.11 whose pip resolves the wheelhouse (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

registry=${REGISTRY:-ghcr.io/transferkit}
python=${PYTHON:-python3}
wheelhouse=images/wheelhouse  # in the build context, where the Dockerfile copies it from
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' images/Dockerfile)
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
push=false
base=false
images=()
for arg in "$@"; do
  case "$arg" in
    --push) push=true ;;
    --base) base=true ;;
    cpu) images+=(cpu:cpu) ;;
    cuda) images+=(cuda:cu128) ;;
    *) echo "usage: images/build.sh [--push] [--base] [cpu] [cuda]  (unknown argument: $arg)" >&2; exit 2 ;;
  esac
done
((${#images[@]})) || images=(cpu:cpu cuda:cu128)
. images/engine.sh

if "$base"; then
  BASE_IMAGE=localhost/${BASE_TAG:-transferkit-base:bookworm}
  "$ENGINE" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || images/base.sh
fi
base_image=${BASE_IMAGE:-python:3.11-slim-bookworm}

# The wheelhouse. torch is pinned and checked before anything is downloaded: the CPU build, a
# few hundred MB, never PyPI's CUDA build (GBs with its nvidia-* wheels).
start=$(date +%s)
mkdir -p "$wheelhouse"
torch_wheels=("$wheelhouse"/torch-"$torch_version"+cpu-*.whl)
if [[ ! -f "${torch_wheels[0]}" ]]; then
  report=$(mktemp)
  "$python" -m pip install --quiet --dry-run --ignore-installed --no-deps --report "$report" \
    ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$torch_version"
  url=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["install"][0]["download_info"]["url"])' "$report")
  rm -f "$report"
  if [[ "$url" != *"torch-$torch_version+cpu-"* && "$url" != *"torch-$torch_version%2Bcpu-"* ]]; then
    echo "pip resolves torch==$torch_version to $url, not a CPU build: set" \
      "TORCH_INDEX=https://download.pytorch.org/whl/cpu or put the CPU wheel in pip's find-links" >&2
    exit 1
  fi
  "$python" -m pip download --quiet --no-deps --dest "$wheelhouse" \
    ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$torch_version"
  torch_wheels=("$wheelhouse"/torch-"$torch_version"+cpu-*.whl)
fi
torch_wheel=${torch_wheels[0]}
size=$(stat -c %s "$torch_wheel")
if ((size > 1024 * 1024 * 1024)); then
  echo "$torch_wheel is $((size >> 20)) MiB: not the CPU build" >&2
  exit 1
fi
rm -f "$wheelhouse"/transferkit-*.whl
# The transferkit wheel, from a copy of the files git tracks or would (no stale build/ folder
# in it, none left in the tree). With fixed timestamps it is the same file while the code is the
# same, so that a rebuild of unchanged code is served from the layer cache.
wheel_source=.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  wheel_source=$(mktemp -d)
  trap 'rm -rf "$wheel_source"' EXIT
  git ls-files -z --cached --others --exclude-standard -- pyproject.toml README.md transferkit \
    components pipelines | tar --null -T - --ignore-failed-read -c 2>/dev/null | tar -x -C "$wheel_source"
fi
# The image's label dev.transferkit.source: a digest of the code the wheel holds, the same as
# transferkit.containers.source_digest, by which a local run in containers tells a stale image.
source_digest=$(cd "$wheel_source" && find transferkit -type f -name '*.py' ! -path '*/__pycache__/*' -print0 |
  LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800} \
  "$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheelhouse" "$wheel_source"
# Every dependency at its locked version: from the wheelhouse alone when it has them all (a
# rebuild), else from the index through pip's cache.
requirements=(-c constraints.txt "$torch_wheel" "$wheelhouse/transferkit-$version-py3-none-any.whl")
"$python" -m pip wheel --quiet --wheel-dir "$wheelhouse" --find-links "$wheelhouse" --no-index \
  "${requirements[@]}" >/dev/null 2>&1 ||
  "$python" -m pip wheel --quiet --wheel-dir "$wheelhouse" --find-links "$wheelhouse" "${requirements[@]}"
digest=$(cd "$wheelhouse" && sha256sum -- *.whl | sha256sum | cut -c1-16)
echo "wheelhouse $wheelhouse: $(find "$wheelhouse" -name "*.whl" | wc -l) wheels, $(du -sm "$wheelhouse" | cut -f1) MiB," \
  "digest $digest, $(($(date +%s) - start)) s"

build=(build)
[[ "$ENGINE" == docker ]] || build+=(--layers)
for image in cpu:cpu cuda:cu128; do
  [[ " ${images[*]} " == *" $image "* ]] || continue
  name=${image%%:*}
  variant=${image##*:}
  tag="$registry/transferkit-$name:$version"
  source=wheelhouse
  [[ "$variant" == cpu ]] || source=index
  echo "building $tag (torch $variant from the $source, base $base_image)"
  start=$(date +%s)
  "$ENGINE" "${build[@]}" --network=host --file images/Dockerfile \
    --build-arg "BASE_IMAGE=$base_image" --build-arg "TORCH_VARIANT=$variant" \
    --build-arg "TORCH_SOURCE=$source" --build-arg "TRANSFERKIT_VERSION=$version" \
    --build-arg "WHEELHOUSE_DIGEST=$digest" --build-arg "TRANSFERKIT_SOURCE=$source_digest" \
    --tag "$tag" .
  seconds=$(($(date +%s) - start))
  case "$ENGINE" in
    docker) bytes=$(docker image inspect --format '{{.Size}}' "$tag") ;;
    *) bytes=$(podman image inspect --format '{{.Size}}' "$tag") ;;
  esac
  echo "built $tag in $seconds s: $((bytes / 1000000)) MB"
  if "$push"; then
    "$ENGINE" push "$tag"
  fi
done
