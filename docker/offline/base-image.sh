#!/usr/bin/env bash
# Base image for hosts that cannot pull from an image registry: Debian bookworm (minbase) with Python 3.11, venv and
# CA certificates, apt lists and caches removed, imported into the local engine. The Dockerfiles build FROM it with
# --build-arg PYTHON_IMAGE=<tag> (docker-compose.offline.yml passes it). Needs root, debootstrap and a Debian mirror.
#
#   sudo docker/offline/base-image.sh                                   # -> local/python:3.11-slim-bookworm
#   sudo EXTRA_CA=/usr/local/share/ca-certificates/proxy.crt docker/offline/base-image.sh
#
# EXTRA_CA: PEM files (space separated) of a TLS-intercepting proxy, added to the image's trust store so that pip
# inside `docker build` can reach PyPI through it (not needed with the local wheelhouse: that is plain HTTP).
set -euo pipefail

TAG=${1:-local/python:3.11-slim-bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
EXTRA_CA=${EXTRA_CA:-}

command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/base-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR"

for ca in $EXTRA_CA; do
    cp "$ca" "$rootfs/usr/local/share/ca-certificates/$(basename "$ca" .crt).crt"
done
chroot "$rootfs" update-ca-certificates

# What a slim image leaves out: package lists and caches (apt-get update again before installing), docs, man pages,
# translations, logs. This is what takes the base from ~265 MB down to ~170 MB.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
find "$rootfs/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +

tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
docker image ls "$TAG"
