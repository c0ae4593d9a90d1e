#!/usr/bin/env bash
# Make a Python 3.11 base image from Debian bookworm with debootstrap, for machines that reach
# Debian's archive but no image registry (python:3.11-slim-bookworm is the usual base). bookworm's
# python3 is 3.11; python3-venv gives the build stage its venv. No compiler is installed.
#
#   images/base.sh                       # -> localhost/transferkit-base:bookworm
#   images/build.sh --base cpu           # the same, then the CPU image on top of it
#
#   BASE_TAG   the image to make (default transferkit-base:bookworm)
#   MIRROR     the Debian archive (default http://deb.debian.org/debian)
#   ENGINE     podman, buildah or docker (see images/engine.sh)
#   TRANSFERKIT_IMAGE_STORAGE  scratch for the root filesystem and the .deb cache
#                              (default /var/tmp/transferkit-images)
set -euo pipefail
cd "$(dirname "$0")/.."
. images/engine.sh

tag=${BASE_TAG:-transferkit-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
scratch=${TRANSFERKIT_IMAGE_STORAGE:-/var/tmp/transferkit-images}
command -v debootstrap >/dev/null || {
  echo "debootstrap is missing: apt-get install -y debootstrap" >&2
  exit 3
}

start=$(date +%s)
mkdir -p "$scratch"
root=$(mktemp -d "$scratch/rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$scratch/debs"  # downloaded packages, kept for the next run
debootstrap --variant=minbase --cache-dir="$scratch/debs" \
  --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >"$scratch/debootstrap.log" ||
  { tail -n 30 "$scratch/debootstrap.log" >&2; exit 1; }
# No package lists, .deb files or logs in the image (the packages' copyright files stay).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
  "$root"/usr/share/man/* "$root"/usr/share/info/*

case "$ENGINE" in
  podman | docker) tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["/usr/bin/python3"]' - "$tag" >/dev/null ;;
  buildah) tar -C "$root" -c . | podman import - "$tag" >/dev/null ;;  # buildah has no import
esac
echo "base image $tag: python $(chroot "$root" /usr/bin/python3 -c 'import sys; print(sys.version.split()[0])'), $(( $(date +%s) - start )) s"
