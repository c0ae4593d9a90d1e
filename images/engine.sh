# shellcheck shell=bash
# Sourced by images/base.sh and images/build.sh: chooses the container engine and, for podman,
# its configuration.
#
#   ENGINE=docker|podman|buildah   the engine (default: docker when its daemon answers, else
#                                  podman, else buildah)
#   CONTAINERS_CONF                podman's settings (default: images/containers.conf)
#   CONTAINERS_STORAGE_CONF        podman's storage (default: one written under
#                                  TRANSFERKIT_IMAGE_STORAGE, /var/tmp/transferkit-images,
#                                  with the overlay driver, or STORAGE_DRIVER=vfs)
images_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ -z "${ENGINE:-}" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null; then
    ENGINE=podman
  elif command -v buildah >/dev/null; then
    ENGINE=buildah
  else
    echo "no container engine: install docker, or podman (apt-get install podman buildah runc)" >&2
    exit 3
  fi
fi
export ENGINE

if [[ "$ENGINE" == podman || "$ENGINE" == buildah ]]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$images_dir/containers.conf}
  if [[ -z "${CONTAINERS_STORAGE_CONF:-}" ]]; then
    storage=${TRANSFERKIT_IMAGE_STORAGE:-/var/tmp/transferkit-images}
    mkdir -p "$storage"
    cat >"$storage/storage.conf" <<CONF
[storage]
driver = "${STORAGE_DRIVER:-overlay}"
graphroot = "$storage/graph"
runroot = "$storage/run"
CONF
    export CONTAINERS_STORAGE_CONF=$storage/storage.conf
  fi
fi
