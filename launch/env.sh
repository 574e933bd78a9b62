#!/usr/bin/env bash
# Sourced by launch/main_job.sh and launch/test.sh: finds Python >= 3.12 (PATH, then
# pyenv), creates .venv with the pinned requirements if needed, and installs the
# Debian package dataset-fashion-mnist if its files are missing. Idempotent.
set -euo pipefail
AGAD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$AGAD_ROOT"

source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"

VENV="$AGAD_ROOT/.venv"
if [ ! -x "$VENV/bin/python" ] || ! py_ok "$VENV/bin/python"; then
  PY="$(find_python)" || {
    echo "agad needs Python >= 3.12 (jax 0.12 / flax 0.12). None found on PATH or under pyenv" >&2
    echo "(${PYENV_ROOT:-~/.pyenv}/versions). Install one, e.g. 'pyenv install 3.12', and re-run." >&2
    exit 1
  }
  echo "[agad] creating $VENV with $PY ($("$PY" --version))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.agad-installed"
WANT="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[agad] installing pinned requirements into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$WANT" > "$STAMP"
fi

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/t10k-labels-idx1-ubyte.gz" ]; then
  echo "[agad] installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
PYTHON="$VENV/bin/python"
export PYTHON
