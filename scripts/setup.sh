#!/usr/bin/env bash
# Install flashfuse (editable) with its test and model-test dependencies into the current python3.
# An installed torch is kept: every install runs under a constraint pinning its version, so no
# extra (transformers, timm) can swap a CPU torch for a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    # torch 2.13.0 is the version CI uses (CPU build); elsewhere pip picks the platform's build.
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
fi
constraints=$(mktemp)
"$PY" - >"$constraints" <<'PYEOF'
import torch
print("torch==" + torch.__version__.split("+")[0])
PYEOF
"$PY" -m pip install -q -c "$constraints" -e ".[test,models]"
rm -f "$constraints"
