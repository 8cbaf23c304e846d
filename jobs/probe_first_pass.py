"""Probe (GPU): where does a fresh process's first pass of the model lose its ~4-9%?

The per-pack probe (``probe_model_alone.py ... packs``) found every pack of the first pass a few % slower than in
the second, at a higher SM clock under the same power: the device is less busy, as if waiting for the host.
The measurements, each with the device kept busy by a sleeping kernel so that only the host's work is timed:

1. ``mm``: host time (median and largest) to queue one matrix product of the model's shapes for a row count seen
   before or not (cuBLAS chooses an algorithm per new shape, and every pack of a first pass has a new token
   count), for small new row counts (the last layer's), for a new row count called eight times in a row (as a
   pack's layers call it), and for the rotary embedding's float32 batched product.
2. ``packs``: host time to queue each of ten packs the first and the second time, against the device's time for
   the pack (if the host waits on the device, its time is the sleeping kernel's ~2 s).
3. ``where``: the Python stack of the host while it waits (faulthandler, after 0.5 s) as it queues the first
   three packs (``where6``: six), torch's warnings of synchronising calls, and the caching allocator's device
   allocations (cudaMalloc) during each pack. With ``full``, the warm-up pack is a full one (``batch_tokens`` in
   512-token sequences), not the default small one.

    python3 jobs/probe_first_pass.py SIZE TOKENIZER_DIR DOCS [mm,packs,where,where6,full]
"""

import faulthandler
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

SLEEP = 4_000_000_000  # cycles: ~2 s of device time queued ahead of the work whose host time is measured


def mm_host(model) -> dict:
    cfg = model.config
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"qkv": (hidden, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd),
              "o": (cfg.num_attention_heads * hd, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}
    rng = np.random.default_rng(0)
    big = rng.choice(np.arange(60_000, 65_536), 40, replace=False).tolist()
    small = rng.choice(np.arange(100, 600), 40, replace=False).tolist()  # the last layer's: one row per sequence
    host = {}
    for name, (k, n) in shapes.items():
        x = torch.randn(65_536, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        torch.mm(x[:1000], w.t())  # the handle and its workspace
        host[name] = _host_times(lambda m, x=x, w=w: torch.mm(x[:m], w.t()), big, small)
    # the rotary embedding's product (transformers' Qwen3RotaryEmbedding): float32 (1, D/2, 1) x (1, 1, T)
    inv = torch.rand(1, hd // 2, 1, device="cuda")
    pos = torch.arange(65_536, device="cuda", dtype=torch.float32)[None, None, :]
    host["rotary_bmm"] = _host_times(lambda m: inv @ pos[..., :m], big, [])
    return host


def _host_times(call, big: list[int], small: list[int]) -> dict:
    """Host microseconds of ``call(rows)``, device busy: median and largest over row counts new, seen, new
    again (rows + 1), small and new, and each new row count called eight times in a row (as a pack's layers)."""
    times = {}
    for label, ms in (("new", big), ("seen", big), ("new_again", [m + 1 for m in big]), ("small_new", small),
                      ("new_repeated", [m + 2 for m in big[:5] for _ in range(8)])):
        if not ms:
            continue
        torch.cuda._sleep(SLEEP)
        t = []
        for m in ms:
            t0 = time.perf_counter()
            call(m)
            t.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        times[label] = [round(float(np.median(t)), 1), round(float(np.max(t)), 1)]
        if label == "new_repeated":  # median over the five row counts of each of the eight calls
            times[label] = np.round(np.median(np.reshape(t, (5, 8)), 0), 1).tolist()
    return times


def queue(emb, enc, batch) -> tuple[float, float]:
    """Host ms to queue one pack with the device busy, and the device's ms for the pack."""
    torch.cuda._sleep(SLEEP)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    emb._forward(enc, batch)
    end.record()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host * 1e3, start.elapsed_time(end)


def packs_host(emb, enc, packs) -> dict:
    out = {}
    for label in ("first", "again"):
        times = np.array([queue(emb, enc, b) for b in packs[:10]])
        out[label] = {"host_ms": np.round(times[:, 0], 1).tolist(), "device_ms": np.round(times[:, 1], 1).tolist()}
        host_ms, device_ms = np.median(times, 0)
        print(f"{label}: host ms median {host_ms:.1f}, device ms median {device_ms:.1f}", flush=True)
    return out


def where_host(emb, enc, packs, n: int = 3) -> None:
    torch.cuda.set_sync_debug_mode("warn")
    for i, batch in enumerate(packs[:n]):
        print(f"--- pack {i}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(0.5)
        allocs = torch.cuda.memory_stats()["num_device_alloc"]
        host, _ = queue(emb, enc, batch)
        faulthandler.cancel_dump_traceback_later()
        allocs = torch.cuda.memory_stats()["num_device_alloc"] - allocs
        print(f"pack {i}: host {host:.1f} ms, {allocs} device allocations", file=sys.stderr, flush=True)
    torch.cuda.set_sync_debug_mode(0)


def main() -> None:
    size, tokdir, n_docs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    what = sys.argv[4].split(",") if len(sys.argv) > 4 else ["mm", "packs"]
    out = {"size": size}
    model = random_model(size, "cuda", "bfloat16")
    with torch.inference_mode():
        if "mm" in what:
            out["mm_host_us_median"] = mm_host(model)
            print(json.dumps(out["mm_host_us_median"]), flush=True)
        tok = AutoTokenizer.from_pretrained(tokdir)
        tok.model_max_length = 1 << 30
        texts = make_corpus(tok, n_docs)
        emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokdir), model=f"random:{size}",
                                   path=tokdir, device="cuda", compile=True, max_length=8192)
        enc = emb.tokenizer.encode(texts)
        if "full" in what:
            emb.packed.warmup(tuple(np.full(emb.batch_tokens // 512, 512).tolist()))
        else:
            emb.packed.warmup()
        torch.cuda.synchronize()
        out["device_allocs_after_warmup"] = torch.cuda.memory_stats()["num_device_alloc"]
        packs = emb.plan_batches(enc.lengths)
        if "where" in what or "where6" in what:
            n = 6 if "where6" in what else 3
            where_host(emb, enc, packs, n)
            packs = packs[n:]
        if "packs" in what:
            out["packs"] = packs_host(emb, enc, packs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
