#!/usr/bin/env bash
# Import time of a worker's heavy modules (torch, transformers' model code, Inductor), each in a fresh process, on
# this machine's Python: "off" with Python's own bytecode setting, "on" with caches.use_bytecode_cache() first
# (its first "on" fills the cache). Prints one line per process, then the cache's size. Run in the checkout.
#   bash jobs/probe_bytecode.sh
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
EMBED_CORPUS_COMPILE_CACHE=$(mktemp -d)
export EMBED_CORPUS_COMPILE_CACHE
py=${PYTHON:-python3}
$py -c 'import sys; print("python", sys.version.split()[0], "dont_write_bytecode", sys.dont_write_bytecode,
      "pycache_prefix", sys.pycache_prefix)'
for mode in off on on off on off on; do
  $py - "$mode" <<'PY'
import sys
import time

if sys.argv[1] == "on":
    from pipeline.model.caches import use_bytecode_cache

    use_bytecode_cache()
t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
from pipeline.model.encoder import import_generation_code_lazily  # noqa: E402

import_generation_code_lazily()
import torch._inductor.compile_fx  # noqa: E402,F401
from transformers import AutoModel  # noqa: E402,F401
from transformers.models.qwen3 import modeling_qwen3  # noqa: E402,F401

t2 = time.perf_counter()
print(f"{sys.argv[1]:4} torch {t1 - t0:5.2f} s, the rest {t2 - t1:5.2f} s, in all {t2 - t0:5.2f} s;"
      f" scikit-learn imported: {'sklearn' in sys.modules}", flush=True)
PY
done
du -sh "$EMBED_CORPUS_COMPILE_CACHE/bytecode" 2>/dev/null || echo "no bytecode cache made: Python keeps torch's bytecode itself here"
rm -rf "$EMBED_CORPUS_COMPILE_CACHE"
