#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install fastsoup with its test tools.
#
#   VENV=.venv  PYTHON=python3  bash scripts/bootstrap.sh
#
# PyTorch: an already-installed torch (in the venv, or in $PYTHON's site-packages) is kept,
# so a GPU machine keeps the user's CUDA build. Otherwise, without an NVIDIA GPU, the CPU build torch==2.13.0 is installed
# (FASTSOUP_TORCH_SPEC overrides the requirement); with a GPU, pip's default torch.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        # Keep the user's PyTorch (and Triton): a CUDA build is never replaced.
        echo "fastsoup: creating $VENV on top of $PYTHON's site-packages (torch found there)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "fastsoup: creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if "$PY" -c "import torch" 2>/dev/null; then
    echo "fastsoup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    if [ -n "${FASTSOUP_TORCH_SPEC:-}" ]; then
        spec=$FASTSOUP_TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch>=2.4"
    else
        spec="torch==2.13.0"
    fi
    echo "fastsoup: installing $spec"
    "${PIP[@]}" install "$spec"
fi

# Build and test tools first: the extension builds without isolation so that it sees
# this environment's torch (and never downloads a second, multi-GB one).
"${PIP[@]}" install "setuptools>=64" wheel "pybind11>=2.11" ninja numpy safetensors tqdm \
    "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6"
if ! "$PY" -c "import triton" 2>/dev/null; then
    "${PIP[@]}" install "triton>=3.0" || echo "fastsoup: triton could not be installed; Triton tests will be skipped" >&2
fi
# diffusers: an extra that fastsoup's core never imports; the examples, the demo and the
# training-step benchmark use it.
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    "${PIP[@]}" install "diffusers>=0.27" || echo "fastsoup: diffusers could not be installed; its tests will be skipped" >&2
fi
"${PIP[@]}" install --no-build-isolation --no-deps -e .
"$PY" -c "import fastsoup, sys; sys.stdout.write('fastsoup %s installed\n' % fastsoup.__version__)"
