#!/usr/bin/env bash
# Adapter Studio launcher (Linux / macOS).
#   ./launch.sh [app options]   first run: create .venv, install PyTorch + requirements; then start the studio
#   ./launch.sh --test [pytest options]   run the test suite in the same environment
# STUDIO_TORCH=cpu|cu126|cu128|... picks the PyTorch build (default: cu128 when nvidia-smi finds a GPU, else cpu).
# STUDIO_PYTHON=/path/to/python picks the interpreter used to create .venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
VENV="$HERE/.venv"
TORCH_VERSION="2.13.0"

find_python() {
    if [ -n "${STUDIO_PYTHON:-}" ]; then echo "$STUDIO_PYTHON"; return; fi
    for p in python3.12 python3.11 python3.10 python3; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 14) else 1)'; then
            echo "$p"; return
        fi
    done
    echo "Adapter Studio needs Python 3.10 to 3.13; install it and run this again." >&2
    exit 1
}

torch_variant() {
    if [ -n "${STUDIO_TORCH:-}" ]; then echo "$STUDIO_TORCH"; return; fi
    if [ "$(uname -s)" = "Darwin" ]; then echo "default"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "cu128"; else echo "cpu"; fi
}

if [ ! -x "$VENV/bin/python" ]; then
    PY="$(find_python)"
    echo "Creating the environment in $VENV (first run only)..."
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

VARIANT="$(torch_variant)"
STAMP="$VENV/.studio-installed"
WANT="torch=$TORCH_VERSION-$VARIANT req=$("$VPY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:16])' "$HERE/requirements.txt")"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "Installing PyTorch $TORCH_VERSION ($VARIANT) and the studio's requirements..."
    PIP=("$VPY" -m pip install --disable-pip-version-check --retries 1 --timeout 30)
    case "$VARIANT" in
        cpu)     "${PIP[@]}" "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu ;;
        cu*)     "${PIP[@]}" "torch==$TORCH_VERSION" --extra-index-url "https://download.pytorch.org/whl/$VARIANT" ;;
        default) "${PIP[@]}" "torch==$TORCH_VERSION" ;;
        *) echo "Unknown STUDIO_TORCH=$VARIANT (use cpu, cu126, cu128, ...)" >&2; exit 1 ;;
    esac
    "${PIP[@]}" -r "$HERE/requirements.txt"
    echo "$WANT" > "$STAMP"
fi

if [ "${1:-}" = "--test" ]; then
    shift
    DEV_STAMP="$VENV/.studio-dev-installed"
    DEV_WANT="$("$VPY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:16])' "$HERE/requirements-dev.txt")"
    if [ "$(cat "$DEV_STAMP" 2>/dev/null || true)" != "$DEV_WANT" ]; then
        "$VPY" -m pip install --disable-pip-version-check -r "$HERE/requirements-dev.txt"
        echo "$DEV_WANT" > "$DEV_STAMP"
    fi
    exec "$VPY" -m pytest "$@"
fi

exec "$VPY" "$HERE/app.py" "$@"
