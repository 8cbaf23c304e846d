#!/usr/bin/env bash
# Set up, then run the test suite (CPU; GPU tests skip themselves where no CUDA device is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
