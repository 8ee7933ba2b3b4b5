#!/usr/bin/env bash
# Creates the venv for benchmarks/peers.py: CPU torch 2.13.0, this repo (editable), and the peers
# learn2learn 0.2.0, higher 0.2.1 and torchopt 0.7.3, made to import beside torch 2.13.0.
#
#   bash benchmarks/peers/setup_venv.sh [VENV_DIR]     # default: benchmarks/.peer-venv
#
# Peers go in with --no-deps so nothing can replace torch (an unpinned torch is a multi-GB CUDA
# build). learn2learn 0.2.0 ships only an sdist whose C files do not compile on Python 3.11: its
# .c files are regenerated from the .pyx with Cython 0.29.37. PyPI's torchvision fails to import
# beside the CPU torch ("operator torchvision::nms does not exist"); its fake-kernel registrations
# are made to skip missing ops, in this venv only.
set -euo pipefail

TORCH_VERSION=2.13.0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO/benchmarks/.peer-venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }

pip install -q --upgrade pip setuptools wheel
# On this project's machines pip's find-links hold the CPU wheel 2.13.0+cpu, which wins over PyPI's.
pip install -q "torch==$TORCH_VERSION"
# The repo itself, with torch pinned so its "torch>=2.3" cannot pull another build.
pip install -q -e "$REPO" "torch==$TORCH_VERSION"

# Imports of the peers: requests and scipy (plain), gym and torchvision without their deps.
pip install -q requests scipy cloudpickle gym_notices optree graphviz typing-extensions "cython==0.29.37"
pip install -q --no-deps gym==0.26.2 torchvision==0.28.0 higher==0.2.1 torchopt==0.7.3

# torchvision: skip its fake-kernel registrations of ops the CPU torch lacks.
"$PY" "$REPO/benchmarks/peers/patch_torchvision.py"

# learn2learn 0.2.0: rebuild its C sources with Cython 0.29.37, then install without build isolation.
if ! pip show -q learn2learn 2>/dev/null; then
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  pip download -q --no-deps --no-binary :all: -d "$WORK" learn2learn==0.2.0
  tar -xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
  SRC="$WORK/learn2learn-0.2.0"
  find "$SRC/learn2learn" -name '*.pyx' -print0 | while IFS= read -r -d '' pyx; do "$VENV/bin/cython" -3 "$pyx"; done
  pip install -q --no-deps --no-build-isolation "$SRC"
fi

INSTALLED="$(pip show torch | sed -n 's/^Version: //p')"
case "$INSTALLED" in
  "$TORCH_VERSION"|"$TORCH_VERSION"+*) ;;
  *) echo "torch is $INSTALLED, expected $TORCH_VERSION" >&2; exit 1 ;;
esac
"$PY" - <<'EOF'
from importlib.metadata import version
import learn2learn, higher, torchopt, torch, fastadapt  # noqa: F401  (each must import)
print(", ".join(f"{name} {version(name)}" for name in ("torch", "fastadapt", "learn2learn", "higher", "torchopt")))
EOF
