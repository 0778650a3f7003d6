#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install fastsoup into it.
#
#   VENV=.venv  PYTHON=python3  bash scripts/bootstrap.sh [test|demo]
#
#   test (default, `make test`): fastsoup, diffusers and the test tools (pytest,
#        pytest-benchmark, hypothesis, triton for the interpreter tests).
#   demo (`make demo`): only what `fastsoup demo` needs: torch, the build requirements,
#        fastsoup's dependencies and diffusers (triton only on a machine with an NVIDIA GPU).
#
# PyTorch: an already-installed torch (in the venv, or in $PYTHON's site-packages) is kept,
# so a GPU machine keeps the user's CUDA build. Otherwise torch==2.13.0 is installed
# (FASTSOUP_TORCH_SPEC overrides the requirement): on Linux without an NVIDIA GPU from
# PyTorch's CPU wheel index (FASTSOUP_TORCH_INDEX overrides the URL; "default" skips it),
# whose wheels are a fraction of the size of the default CUDA build; when that index is
# unreachable, or pip is configured with its own index (PIP_INDEX_URL, pip.conf), from
# pip's configured index. With a GPU, pip's default torch.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-test}
case "$MODE" in
    test|demo) ;;
    *) echo "usage: bash scripts/bootstrap.sh [test|demo]" >&2; exit 2 ;;
esac
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

has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# The URL of PyTorch's CPU wheel index when it should be used and answers, else nothing.
cpu_torch_index() {
    local url=${FASTSOUP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
    [ "$url" = "default" ] && return 0
    [ "$(uname -s)" = "Linux" ] || return 0          # macOS and Windows wheels are CPU builds
    if [ -z "${FASTSOUP_TORCH_INDEX:-}" ]; then       # an index the user configured wins
        [ -n "${PIP_INDEX_URL:-}" ] && return 0
        [ -n "$("${PIP[@]}" config get global.index-url 2>/dev/null || true)" ] && return 0
    fi
    if "$PY" - "$url" <<'EOF' >/dev/null 2>&1; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
EOF
        echo "$url"
    else
        echo "fastsoup: $url is unreachable; installing torch from pip's configured index" >&2
    fi
}

if "$PY" -c "import torch" 2>/dev/null; then
    echo "fastsoup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    index=""
    if [ -n "${FASTSOUP_TORCH_SPEC:-}" ]; then
        spec=$FASTSOUP_TORCH_SPEC
        has_nvidia_gpu || index=$(cpu_torch_index)
    elif has_nvidia_gpu; then
        spec="torch>=2.4"
    else
        spec="torch==2.13.0"
        index=$(cpu_torch_index)
    fi
    if [ -n "$index" ]; then
        echo "fastsoup: installing $spec (CPU build, from $index)"
        if ! "${PIP[@]}" install --index-url "$index" "$spec"; then
            echo "fastsoup: the CPU index failed; installing $spec from pip's configured index" >&2
            "${PIP[@]}" install "$spec"
        fi
    else
        echo "fastsoup: installing $spec"
        "${PIP[@]}" install "$spec"
    fi
fi

# Build requirements and fastsoup's dependencies first: the extension builds without
# isolation so that it sees this environment's torch (and never downloads a second one).
"${PIP[@]}" install "setuptools>=64" wheel "pybind11>=2.11" numpy safetensors tqdm
if [ "$MODE" = "test" ]; then
    "${PIP[@]}" install ninja "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6"
elif has_nvidia_gpu; then
    "${PIP[@]}" install ninja   # builds the CUDA extension
fi
# triton: the GPU kernels, and the interpreter tests on a CPU-only machine.
if { [ "$MODE" = "test" ] || has_nvidia_gpu; } && ! "$PY" -c "import triton" 2>/dev/null; then
    "${PIP[@]}" install "triton>=3.0" || echo "fastsoup: triton could not be installed; Triton tests will be skipped" >&2
fi
# diffusers: an extra that fastsoup's core never imports; the demo, the examples and the
# training-step benchmark use it.
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if [ "$MODE" = "demo" ]; then
        "${PIP[@]}" install "diffusers>=0.27"
    else
        "${PIP[@]}" install "diffusers>=0.27" || echo "fastsoup: diffusers could not be installed; its tests will be skipped" >&2
    fi
fi
# peft: diffusers loads LoRA adapters through it; the test that a LoRA soup loads with
# diffusers' LoRA loader needs it (skipped without).
if [ "$MODE" = "test" ] && ! "$PY" -c "import peft" 2>/dev/null; then
    "${PIP[@]}" install peft || echo "fastsoup: peft could not be installed; the LoRA loading test will be skipped" >&2
fi
"${PIP[@]}" install --no-build-isolation --no-deps -e .
"$PY" -c "import fastsoup, sys; sys.stdout.write('fastsoup %s installed\n' % fastsoup.__version__)"
