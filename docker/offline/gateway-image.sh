#!/usr/bin/env bash
# Builds the Debian nginx gateway image (docker/offline/Dockerfile.gateway) FROM the local base image, with the
# host's network (apt reaches the Debian mirror configured in the base image).
#
#   docker/offline/gateway-image.sh [TAG]        # default retrieval-gateway:debian, base from BASE_IMAGE
#
# `docker compose -f docker-compose.yml -f docker-compose.offline.yml build` builds the same image; this script is
# for building it alone.
set -euo pipefail
TAG=${1:-retrieval-gateway:debian}
BASE_IMAGE=${BASE_IMAGE:-local/python:3.11-slim-bookworm}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
docker build --network host -f "$ROOT/docker/offline/Dockerfile.gateway" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -t "$TAG" "$ROOT/docker"
docker image ls "$TAG"
