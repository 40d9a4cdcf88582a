#!/usr/bin/env bash
# Wheelhouse for image builds without a route to the package indexes: every distribution the CPU image installs
# (torch + torchvision as pinned, pyproject's dependencies and the `cpu` extra, setuptools to build the project),
# downloaded with pip for the image's platform (Linux x86_64, CPython 3.11) and laid out as a PEP 503 index.
#
#   docker/offline/wheelhouse.sh [DIR]                                         # default DIR: out/wheelhouse
#   python3 -m http.server 8765 --bind 127.0.0.1 --directory out/wheelhouse &  # serve it (loopback only)
#   export PIP_INDEX_URL=http://127.0.0.1:8765/simple TORCH_INDEX_URL=http://127.0.0.1:8765/simple
#   docker compose -f docker-compose.yml -f docker-compose.offline.yml build  # builds with the host's network
#
# Run it where the indexes are reachable (or where pip is configured with a mirror or a find-links folder: pip's own
# configuration applies), then carry DIR to the build host. TORCH_INDEX_URL (default: PyTorch's CPU wheel index) is
# where the torch CPU build comes from; set it empty when pip's configuration already provides one. EXTRAS picks the
# extras (default cpu), PYTHON the interpreter that runs pip.
set -euo pipefail

DIR=${1:-out/wheelhouse}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

mkdir -p "$DIR/files"
reqs="$DIR/requirements.txt"
"$PYTHON" "$ROOT/docker/requirements.py" "$EXTRAS" --pyproject "$ROOT/pyproject.toml" > "$reqs"
# what pip needs to build the project itself (pyproject's [build-system] requires)
mapfile -t build_reqs < <("$PYTHON" -c \
    'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' \
    "$ROOT/pyproject.toml")

# Wheels for the image, whatever the host: the image is Linux x86_64 with CPython 3.11.
platform=(--only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64
          --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
extra=()
[ -n "$TORCH_INDEX_URL" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")

"$PYTHON" -m pip download --dest "$DIR/files" "${platform[@]}" "${extra[@]}" -r "$reqs" "${build_reqs[@]}" wheel
"$PYTHON" "$HERE/pep503.py" "$DIR"
du -sh "$DIR/files"
