"""Probe (GPU): why is the bench's model-alone rate below a fresh process's repeated passes?

One process with empty compile caches of its own, one embedder, the bench's corpus; the compiled warm-up on a
small pack (the default) or a full one (``full``: Inductor settles some launch settings on a kernel's first
call); then passes of the model alone in this order: three plain, two with the nvidia-smi clock sampler running
(as the bench runs them), one plain, two plain after a run_job (the pipeline in this process, as the bench
interleaves it). Prints each pass's tokens/s. With ``passes`` last: four plain passes only, each with the
caching allocator's device allocations (cudaMalloc calls) during it, and the allocator and module-loading
settings of the environment (``PYTORCH_CUDA_ALLOC_CONF``, ``CUDA_MODULE_LOADING``): is the first pass slow
because memory or kernels are fetched then? With ``packs`` last: three passes, each pack's device time between
CUDA events recorded as it is queued (no waiting in between), and the SM clock once a second: are all of the
first pass's packs slower, or a few (a stall), and does the clock differ?

    python3 jobs/probe_model_alone.py SIZE TOKENIZER_DIR DOCS WORKDIR [small|full] [passes|packs]
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pipeline.bench.command import GpuClocks  # noqa: E402
from pipeline.bench.gpu import make_corpus, random_model  # noqa: E402
from pipeline.bench.paths import timed  # noqa: E402
from pipeline.job.config import make_config  # noqa: E402
from pipeline.job.runner import run_job  # noqa: E402
from pipeline.model.encoder import Embedder  # noqa: E402

size, tokdir, n_docs, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
warm = sys.argv[5] if len(sys.argv) > 5 else "small"
mode = sys.argv[6] if len(sys.argv) > 6 else "all"
tok = AutoTokenizer.from_pretrained(tokdir)
tok.model_max_length = 1 << 30
texts = make_corpus(tok, n_docs)
model = random_model(size, "cuda", "bfloat16")
emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokdir), model=f"random:{size}", path=tokdir,
                           device="cuda", compile=True, max_length=8192)
enc = emb.tokenizer.encode(texts)
t0 = time.perf_counter()
emb.packed.warmup() if warm == "small" else emb.packed.warmup(tuple(np.full(emb.batch_tokens // 512, 512).tolist()))
tokens = int(enc.lengths.sum())
out = {"size": size, "warm": warm, "warmup_s": round(time.perf_counter() - t0, 1), "tokens": tokens}


def rate() -> int:
    return round(tokens / timed(lambda: emb.embed_encoded(enc), "cuda")[0])


if mode == "packs":
    import torch

    out["passes"] = []
    for _ in range(3):
        events, sizes = [torch.cuda.Event(enable_timing=True)], []
        events[0].record()

        def mark(batch, events=events, sizes=sizes) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)
            sizes.append(int(enc.lengths[batch].sum()))

        with GpuClocks() as clocks:
            seconds, _ = timed(lambda: emb.embed_encoded(enc, on_batch=mark), "cuda")
        ms = [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]
        out["passes"].append({"tokens_per_s": round(tokens / seconds), "pack_tokens": sizes,
                              "pack_ms": [round(m, 3) for m in ms], "clocks": clocks.summary()})
    first, later = (np.asarray(p["pack_ms"]) for p in out["passes"][:2])
    out["first_over_second_per_pack"] = np.round(first / later, 3).tolist()
    print(json.dumps(out))
    sys.exit(0)
if mode == "passes":
    import torch

    out["env"] = {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_MODULE_LOADING")}
    out["passes"] = []
    for _ in range(4):
        before = torch.cuda.memory_stats()["num_device_alloc"]
        r = rate()
        allocs = torch.cuda.memory_stats()["num_device_alloc"] - before
        out["passes"].append({"tokens_per_s": r, "device_allocs": allocs,
                              "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)})
    print(json.dumps(out))
    sys.exit(0)
out["plain"] = [rate() for _ in range(3)]
with GpuClocks() as clocks:
    out["with_nvidia_smi_sampler"] = [rate() for _ in range(2)]
out["clocks"] = clocks.summary()
out["plain_after_sampler"] = [rate()]
work.mkdir(parents=True, exist_ok=True)
src = work / "corpus.parquet"
pq.write_table(pa.table({"id": [f"d{i}" for i in range(n_docs)], "text": texts}), src, row_group_size=256)
cfg = make_config({"input": (str(src),), "output": str(work / "out"), "model": f"random:{size}",
                   "batch_tokens": emb.batch_tokens, "shard_size": max(64, n_docs // 4), "quiet": True,
                   "max_length": 8192, "device": "cuda"})
t0 = time.perf_counter()
run_job(cfg, overwrite=True, embedder=emb)
out["run_job_s"] = round(time.perf_counter() - t0, 2)
out["plain_after_run_job"] = [rate() for _ in range(2)]
print(json.dumps(out))
