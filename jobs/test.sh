#!/usr/bin/env bash
# Set up with the test tools, then run the test suite (CPU; GPU tests skip themselves where no CUDA device is
# present). Skipped tests are listed with their reasons (-rs).
#
# The Slurm tests need a cluster that answers `sinfo`. Where none does and this runs as root, a throw-away
# one-node cluster is started (jobs/slurm/start-local-cluster.sh: Debian's packages, installed when missing) and
# stopped by its recorded PIDs when this script exits, however it exits. EMBED_CORPUS_SLURM=0: never start one;
# EMBED_CORPUS_SLURM=require (CI): fail when it cannot be started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh test
export HF_HUB_OFFLINE=1

if [[ ${EMBED_CORPUS_SLURM:-1} != 0 && $EUID -eq 0 ]] \
    && ! { command -v sinfo >/dev/null && [[ -n "$(timeout 5 sinfo -h -N -o %T 2>/dev/null)" ]]; }; then
    # Stop only a cluster started here: one that was already answering belongs to someone else.
    trap 'bash jobs/slurm/stop-local-cluster.sh' EXIT
    if ! bash jobs/slurm/start-local-cluster.sh; then
        [[ ${EMBED_CORPUS_SLURM:-} == require ]] && exit 1
        echo "test.sh: no local Slurm cluster (see above); the Slurm tests will be skipped" >&2
    fi
fi
.venv/bin/python -m pytest -q -rs "$@"
