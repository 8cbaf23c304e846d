"""Probe (GPU): is a fresh process's slow first pass the device coming out of idle, or shapes it has not run?

The first pass of the model after start-up runs 5-9% below the next ones (``probe_model_alone.py``), and so
does the command's first shard; every pack of it, at a higher SM clock under the same power. Two explanations
predict different things:

- shapes: a pack whose shapes the process has not run costs host time (cuBLAS chooses an algorithm per new
  shape, ``probe_first_pass.py``), so a pass of new packs is slow after any history, and a pass of packs seen
  before is fast after any pause;
- idle: the device's power and clock management, after seconds idle (start-up: imports, load, compile), takes a
  while at full load to settle, so the first seconds of work after a pause are slow, whatever the shapes.

The corpus is cut in thirds (each its own packs), then, in one process after the compiled warm-up:
  a. 5 s of large matrix products (the device at full load), at once third 1 (new shapes, device busy before)
  b. third 1 again (seen, busy before)
  c. 20 s idle, third 1 again (seen, idle before)
  d. third 2 at once (new, busy before)
  e. 20 s idle, third 3 (new, idle before)
  f. third 3 again (seen, busy before)
Each pass: tokens/s, device ms per pack (CUDA events queued with the pack), the host's time to queue it (the
host running ahead of the device or in step with it), and the SM clock, power and clock-event reasons sampled
every 100 ms. With ``PROBE_BLAS=cublaslt`` the products go through cuBLASLt. With ``PROBE_PREWARM=exact``, before
pass a, every matrix product of every pack of the three thirds is run once on its own (the layers' products at
each pack's token count, the last layer's at its sequence count, the rope's float32 product): if the first
passes then run as fast as the seen ones, the fading first pass is the products' per-shape cost, and a small set
of pack shapes run once at start-up would remove it. ``PROBE_PREWARM=geo`` runs the same products at row counts
1..budget ~2% apart instead (what start-up could do without knowing the packs). ``PROBE_QUICK=1`` leaves out
the idle passes c and e.

    python3 jobs/probe_idle.py SIZE TOKENIZER_DIR DOCS
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pipeline.bench.gpu import make_corpus, random_model  # noqa: E402
from pipeline.model.encoder import Embedder  # noqa: E402
from pipeline.model.packed import spaced_counts  # noqa: E402

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


class Sampler:
    """nvidia-smi every 100 ms into memory, with the host clock of each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                      "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter(), line.strip()))

    def between(self, t0: float, t1: float) -> dict:
        rows = [line.split(", ") for t, line in self.lines if t0 <= t <= t1]
        if not rows:
            return {}
        clock = [float(r[1]) for r in rows if len(r) > 4]
        power = [float(r[2]) for r in rows if len(r) > 4]
        reasons: dict[str, int] = {}
        for r in rows:
            if len(r) > 4:
                reasons[r[4]] = reasons.get(r[4], 0) + 1
        return {"samples": len(clock), "sm_mhz": [int(c) for c in clock], "power_w_median": float(np.median(power)),
                "temp_c": rows[-1][3], "event_reasons": reasons}

    def stop(self) -> None:
        self.proc.terminate()


def one_pass(emb: Embedder, enc, sampler: Sampler, label: str) -> dict:
    events, host, sizes = [torch.cuda.Event(enable_timing=True)], [], []

    def mark(batch) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        host.append(time.perf_counter())
        sizes.append(int(enc.lengths[batch].sum()))

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    events[0].record()
    emb.embed_encoded(enc, on_batch=mark)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    ms = [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]
    device_s = sum(ms) / 1e3
    return {"label": label, "tokens": int(enc.lengths.sum()), "wall_s": round(t1 - t0, 4),
            "tokens_per_s": round(int(enc.lengths.sum()) / (t1 - t0)),
            "device_s": round(device_s, 4), "packs": len(ms), "pack_ms": [round(m, 2) for m in ms],
            "host_queue_s": [round(h - t0, 3) for h in host], "clocks": sampler.between(t0, t1)}


def pack_counts(emb: Embedder, encs: list) -> tuple[set[int], set[int]]:
    """The token counts and the sequence counts of the packs of ``encs``."""
    tokens, seqs = set(), set()
    for enc in encs:
        for batch in emb.plan_batches(enc.lengths):
            tokens.add(int(enc.lengths[batch].sum()))
            seqs.add(len(batch))
    return tokens, seqs


def prewarm(cfg, tokens: set[int], seqs: set[int] = frozenset(), device: str = "cuda") -> int:
    """Each product of a layer once on its own at each row count of ``tokens | seqs`` (random weights of the
    model's shapes), and the rope's float32 product at each of ``tokens``."""
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for n, k in
               (((n_q + 2 * n_kv) * hd, hidden), (hidden, n_q * hd), (2 * inter, hidden), (hidden, inter))]
    inv = torch.rand(1, hd // 2, 1, device=device)
    x = torch.randn(max(tokens | seqs), max(hidden, inter, n_q * hd), device=device, dtype=torch.bfloat16)
    pos = torch.arange(max(tokens), device=device, dtype=torch.float32)[None, None, :]
    for m in sorted(tokens | seqs):
        for w in weights:
            torch.nn.functional.linear(x[:m, : w.shape[1]], w)
        if m in tokens:
            inv @ pos[..., :m]
    torch.cuda.synchronize()
    return len(tokens | seqs)


def burn(seconds: float) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def main() -> None:
    size, tokdir, n_docs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if os.environ.get("PROBE_BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["PROBE_BLAS"])
    tok = AutoTokenizer.from_pretrained(tokdir)
    tok.model_max_length = 1 << 30
    texts = make_corpus(tok, n_docs)
    model = random_model(size, "cuda", "bfloat16")
    emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokdir), model=f"random:{size}", path=tokdir,
                               device="cuda", compile=True, max_length=8192)
    order = np.random.default_rng(0).permutation(len(texts))
    thirds = [emb.tokenizer.encode([texts[i] for i in rows]) for rows in np.array_split(order, 3)]
    emb.packed.warmup()
    prewarmed = 0
    mode = os.environ.get("PROBE_PREWARM", "")
    if mode:
        t0 = time.perf_counter()
        # geo: row counts 1..budget ~2% apart (no knowledge of the packs to come); exact: the packs' own
        prewarmed = (prewarm(model.config, set(spaced_counts(emb.batch_tokens))) if mode == "geo"
                     else prewarm(model.config, *pack_counts(emb, thirds)))
        print(f"prewarmed {prewarmed} row counts in {time.perf_counter() - t0:.1f} s", flush=True)
    sampler = Sampler()
    time.sleep(1.0)
    passes = []
    t = time.perf_counter()
    burn(5.0)
    passes.append(one_pass(emb, thirds[0], sampler, "a: third 1, new, after 5 s of products"))
    passes.append(one_pass(emb, thirds[0], sampler, "b: third 1, seen, busy before"))
    quick = bool(os.environ.get("PROBE_QUICK"))  # without the idle passes c and e
    if not quick:
        time.sleep(20)
        passes.append(one_pass(emb, thirds[0], sampler, "c: third 1, seen, 20 s idle before"))
    passes.append(one_pass(emb, thirds[1], sampler, "d: third 2, new, busy before"))
    if not quick:
        time.sleep(20)
        passes.append(one_pass(emb, thirds[2], sampler, "e: third 3, new, 20 s idle before"))
    passes.append(one_pass(emb, thirds[2], sampler, "f: third 3, new, busy before" if quick
                           else "f: third 3, seen, busy before"))
    sampler.stop()
    out = {"size": size, "blas": os.environ.get("PROBE_BLAS", "default"), "prewarm": mode or "none",
           "prewarmed_row_counts": prewarmed,
           "docs": n_docs,
           "seconds": round(time.perf_counter() - t, 1), "passes": passes}
    for p in passes:
        print(f"{size} {out['blas']:9} {p['label']:42} {p['tokens_per_s']:>9,} tok/s  device {p['device_s']:.3f} s"
              f"  wall {p['wall_s']:.3f} s  first pack {p['pack_ms'][0]:.1f} ms  host queued all at "
              f"{p['host_queue_s'][-1]:.3f} s  SM MHz {p['clocks'].get('sm_mhz')}  {p['clocks'].get('event_reasons')}",
              flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
