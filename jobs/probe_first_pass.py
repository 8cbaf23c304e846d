"""Probe (GPU): where does a fresh process's first pass of the model lose its ~4%?

The per-pack probe (``probe_model_alone.py ... packs``) found every pack of the first pass ~4% slower than in
the second, at a higher SM clock under the same power: the device is less busy, as if waiting for the host.
Two measurements:

1. Host time to queue one matrix product of the model's shapes for a row count seen before or not (the device
   kept busy by a sleeping kernel, so only the host's work is timed): cuBLAS chooses an algorithm per new shape,
   and every pack of a first pass has a new token count.
2. Host time to queue a whole pack of the model the first and the second time (device busy, as in 1), against
   the device's time for the pack: is a first pass's host slower than its device? With the packs not rounded and
   rounded to ``PACK_MULTIPLE`` tokens (``PackedDecoder.pack_multiple``).

    python3 jobs/probe_first_pass.py SIZE TOKENIZER_DIR DOCS
"""

import json
import os
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pipeline.bench.gpu import make_corpus, random_model  # noqa: E402
from pipeline.model.encoder import Embedder  # noqa: E402

size, tokdir, n_docs = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {"size": size}

# 1. the host's cost of a matrix product of a new row count, device busy
model = random_model(size, "cuda", "bfloat16")
cfg = model.config
hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
shapes = {"qkv": (hidden, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd),
          "o": (cfg.num_attention_heads * hd, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}
rng = np.random.default_rng(0)
rows = rng.choice(np.arange(60_000, 65_536), 40, replace=False).tolist()
host = {}
with torch.inference_mode():
    for name, (k, n) in shapes.items():
        x = torch.randn(65_536, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        torch.mm(x[:1000], w.t())  # the handle and its workspace
        torch.cuda.synchronize()
        times = {}
        for label, ms in (("new", rows), ("seen", rows), ("new_again", [m + 1 for m in rows]),
                          ("new_repeated", [m + 2 for m in rows[:5] for _ in range(8)])):
            torch.cuda._sleep(2_000_000_000)  # ~1 s ahead of the products
            t = []
            for m in ms:
                t0 = time.perf_counter()
                torch.mm(x[:m], w.t())
                t.append(time.perf_counter() - t0)
            times[label] = round(float(np.median(t)) * 1e6, 1)
            if label == "new_repeated":  # each new row count 8 times in a row, as the layers of a pack call it
                times[label] = np.round(np.median(np.reshape(t, (5, 8)), 0) * 1e6, 1).tolist()
            torch.cuda.synchronize()
        host[name] = times
out["mm_host_us_median"] = host
print(json.dumps(host), flush=True)

# 2. the host's time to queue each pack the first and the second time it is seen, the device kept busy (so the host
# never waits on it), against the device's time for the pack; without and with the packs rounded
tok = AutoTokenizer.from_pretrained(tokdir)
tok.model_max_length = 1 << 30
texts = make_corpus(tok, n_docs)
emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokdir), model=f"random:{size}", path=tokdir,
                           device="cuda", compile=True, max_length=8192)
enc = emb.tokenizer.encode(texts)
emb.packed.warmup()
torch.cuda.synchronize()
packs = emb.plan_batches(enc.lengths)


def queue(batch) -> tuple[float, float]:
    torch.cuda._sleep(4_000_000_000)  # ~2 s of device time ahead
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    emb._forward(enc, batch)
    end.record()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host * 1e3, start.elapsed_time(end)


with torch.inference_mode():
    for multiple in (1, 256, 1):
        emb.packed.pack_multiple = multiple
        for label, chosen in (("first", packs[:10]), ("again", packs[:10])):
            times = np.array([queue(b) for b in chosen])
            key = f"multiple_{multiple}_{label}" + ("_2" if f"multiple_{multiple}_{label}" in out else "")
            out[key] = {"host_ms": np.round(times[:, 0], 1).tolist(), "device_ms": np.round(times[:, 1], 1).tolist()}
            host_ms, device_ms = np.median(times, 0)
            print(f"{key}: host ms median {host_ms:.1f}, device ms median {device_ms:.1f}", flush=True)
        packs = packs[10:]
print(json.dumps(out))
