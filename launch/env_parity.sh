#!/usr/bin/env bash
# Dev-only: creates .venv-parity (Python >= 3.12) with agad's pinned requirements, agad
# itself (editable), and the reference PyTorch AutoAttack (pyautoattack==0.2.0, whose
# attack files match fra31/auto-attack@a392200) on torch==2.13.0, for
# `python tools/parity_autoattack.py`. torch and pyautoattack are never agad runtime
# dependencies: they live only in this venv. Idempotent; source it or run it.
#
# torch comes from pip's configured index (pip.conf, PIP_INDEX_URL / PIP_EXTRA_INDEX_URL):
# point those at an index of CPU-only torch wheels to avoid the default Linux wheel, the
# CUDA build (~3 GB with its nvidia-* dependencies; it runs on CPU all the same).
set -euo pipefail
AGAD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$AGAD_ROOT"

TORCH_VERSION=2.13.0
PYAUTOATTACK_VERSION=0.2.0

source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"

VENV="$AGAD_ROOT/.venv-parity"
if [ ! -x "$VENV/bin/python" ] || ! py_ok "$VENV/bin/python"; then
  PY="$(find_python)" || {
    echo "the parity venv needs Python >= 3.12 (jax 0.12 / flax 0.12); none found" >&2
    exit 1
  }
  echo "[agad-parity] creating $VENV with $PY ($("$PY" --version))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.agad-parity-installed"
PINS="torch==$TORCH_VERSION pyautoattack==$PYAUTOATTACK_VERSION"
WANT="$( (cat requirements.txt pyproject.toml; echo "$PINS") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[agad-parity] installing agad's requirements and $PINS"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q --no-deps "pyautoattack==$PYAUTOATTACK_VERSION"
  "$VENV/bin/python" -c \
    "import torch, pyautoattack, agad; print('[agad-parity] torch', torch.__version__)"
  echo "$WANT" > "$STAMP"
fi
PYTHON_PARITY="$VENV/bin/python"
export PYTHON_PARITY
