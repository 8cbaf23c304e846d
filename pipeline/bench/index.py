"""Index benchmark: the automatic choice against a flat index and a plain IVF-Flat, on realistic vectors.

``python -m pipeline.bench.index --n 1000000 --dims 384`` writes ``n`` vectors as the vector parts of a synthetic
output directory, then, in one run and each in its own process (so peak memory is measured per method):

* ``auto``: ``build_index`` with the default budget (its choice, training sample, streaming add, nprobe/efSearch
  tuned to recall@10 >= 0.95 on held-out corpus vectors);
* ``flat``: ``IndexFlatIP``, exact;
* ``ivf-default``: ``IVF{sqrt n},Flat`` with faiss's defaults: trained on faiss's own subsample of all vectors
  (256 per list), ``nprobe=1``.

Each is scored on fresh queries from the same distribution (not corpus vectors): recall@10 against exact
search, and queries/s for a batch of 1000 queries on all cores (best of 3). Peak memory is the process's
``VmHWM`` (build and search), build time includes reading the vectors from Parquet. A table is printed and the
numbers are written as JSON.

Realistic vectors: real sentence embeddings are neither uniform noise nor isotropic. They are drawn here from a
mixture of ``n / 500`` Gaussian clusters of Zipf-like sizes, with a power-law (i^-0.8) variance spectrum under a
random rotation, a shared mean direction (the anisotropy of embedding spaces: random pairs have cosine ~0.2),
per-cluster spreads drawn log-normally, then L2-normalised as the pipeline stores them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.job.sink import embedding_array

log = logging.getLogger(__name__)


class ClusteredSource:
    """A fixed random mixture distribution over unit vectors of ``dims`` dimensions (see the module docstring).

    Args:
        dims: vector size.
        clusters: number of mixture components.
        seed: fixes the distribution (centres, spreads, rotation); samples take their own generator.
    """

    def __init__(self, dims: int, clusters: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dims = dims
        scale = np.arange(1, dims + 1, dtype=np.float64) ** -0.4  # std; variance ~ i^-0.8
        q, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
        self.rotation = q.astype(np.float32)
        self.scale = scale.astype(np.float32)
        self.mean = (rng.standard_normal(dims) * scale).astype(np.float32) * 0.6
        self.centres = (rng.standard_normal((clusters, dims)) * scale).astype(np.float32)
        self.spread = np.exp(rng.normal(np.log(0.45), 0.35, clusters)).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
        self.weights = rng.permutation(weights / weights.sum())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` unit vectors, float32 (n, dims)."""
        comp = rng.choice(len(self.centres), n, p=self.weights)
        noise = rng.standard_normal((n, self.dims), dtype=np.float32) * self.scale
        x = self.mean + self.centres[comp] + noise * self.spread[comp, None]
        x = x @ self.rotation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def clustered_vectors(n: int, dims: int, *, clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """``n`` realistic unit vectors (float32 (n, dims)) in one array; for tests and small benchmarks."""
    source = ClusteredSource(dims, clusters or max(8, n // 500), seed)
    return source.sample(n, np.random.default_rng(seed + 1))


def write_vector_output(
    out: str | Path,
    vectors: np.ndarray,
    *,
    ids: list[str] | None = None,
    shard_size: int = 10_000,
    first_shard: int = 0,
    dtype: str = "float32",
    done: bool = True,
) -> list[Path]:
    """Write ``vectors`` as parts of an output directory and publish them as a new version added to the live one
    (``job.versions.publish``), as a job would, without a model: for index tests and benchmarks.

    Args:
        out: the output directory.
        vectors: float32 (n, dims).
        ids: one id per vector (default ``v{position}``).
        shard_size: vectors per part.
        first_shard: id of the first part written (to extend an output: ids are never reused).
        dtype: stored dtype, ``float32`` or ``float16``.
        done: publish the parts (False: parts of an unfinished run, which readers do not see).

    Returns:
        The part files written.
    """
    from pipeline.job.scan import hash128
    from pipeline.job.sink import docs_table, write_part
    from pipeline.job.versions import publish

    out = Path(out)
    n = len(vectors)
    ids = ids if ids is not None else [f"v{i}" for i in range(n)]
    paths, parts = [], []
    for i, start in enumerate(range(0, n, shard_size)):
        end = min(n, start + shard_size)
        part = first_shard + i
        table = pa.table({"id": pa.array(ids[start:end], pa.string()),
                          "embedding": embedding_array(vectors[start:end], dtype),
                          "n_tokens": pa.array(np.ones(end - start, dtype=np.int32)),
                          "truncated": pa.array(np.zeros(end - start, dtype=bool))})
        h = hash128(ids[start:end])
        docs = docs_table(h, h, np.zeros(end - start, np.uint64), np.arange(end - start), np.ones(end - start))
        paths.append(write_part(out, part, table, docs))
        parts.append(part)
    if done:
        publish(out, parts)
    return paths


def _write_corpus(out: Path, n: int, dims: int, source: ClusteredSource, shard_size: int, seed: int) -> None:
    for i, start in enumerate(range(0, n, shard_size)):
        rows = min(shard_size, n - start)
        x = source.sample(rows, np.random.default_rng([seed, i]))
        write_vector_output(out, x, ids=[f"v{start + j}" for j in range(rows)], shard_size=shard_size, first_shard=i)


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. ``VmHWM`` is per process image; ``ru_maxrss`` would carry over the
    parent's size across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _qps(index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Queries per second of one batch search over all cores, best of ``repeats`` (the machine may be shared)."""
    index.search(queries[:10], k)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, ids


def _recall10(found: np.ndarray, truth: np.ndarray) -> float:
    from pipeline.index.recall import recall_at

    return recall_at(found[:, :10], truth[:, :10], 10)


def _run_method(method: str, out: str, queries_path: str, result_path: str) -> None:
    """Child process: build one index, measure it, write a JSON result."""
    import faiss

    from pipeline.index import vectors as vec

    data = np.load(queries_path)
    queries, truth = data["queries"], data["truth"]
    base_rss = _peak_rss_bytes()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"method": method}
    if method == "auto":
        from pipeline.index.files import load_index
        from pipeline.index.store import build_index

        info = build_index(out)
        index, _ = load_index(out)
        result.update(factory=info["factory"], reason=info["choice"]["reason"], params=info["search_params"],
                      info_recall10=info["recall@10"], info_recall1=info["recall@1"], info_recall100=info["recall@100"],
                      train_seconds=info["trained"].get("seconds"), size_bytes=info["size_bytes"],
                      phases={"read_sample": info["sample_read_seconds"], "train": info["trained"].get("seconds"),
                              "add": info["add_seconds"], "ground_truth": info["tuning"]["ground_truth_seconds"],
                              "tune": info["tuning"]["seconds"], "write": info["write_seconds"]})
    else:
        parts = vec.complete_parts(out)
        d = parts[0].dims
        n = sum(p.rows for p in parts)
        if method == "flat":
            index = faiss.IndexFlatIP(d)
            result.update(factory="Flat", params={})
        else:
            nlist = 2 ** int(round(np.log2(np.sqrt(n))))
            index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            # faiss's defaults: train on everything given (k-means itself subsamples 256 per list), nprobe 1
            allx = np.concatenate([vec.read_part_vectors(p) for p in parts])
            t_train = time.perf_counter()
            index.train(allx)
            result.update(factory=f"IVF{nlist},Flat", params={"nprobe": 1},
                          train_seconds=round(time.perf_counter() - t_train, 2))
            del allx
        for p in parts:
            for x, _ in vec.iter_batches(p):
                index.add(x)
        with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
            faiss.write_index(index, f.name)
            result["size_bytes"] = os.path.getsize(f.name)
    result["build_seconds"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["rss_before_bytes"] = base_rss
    qps, found = _qps(index, queries, 10)
    result["qps"] = round(qps, 1)
    result["recall@10"] = round(_recall10(found, truth), 4)
    Path(result_path).write_text(json.dumps(result))


def _child(method: str, out: Path, queries_path: Path, work: Path) -> dict[str, Any]:
    import subprocess

    result_path = work / f"result-{method}.json"
    cmd = [sys.executable, "-m", "pipeline.bench.index", "--child", method, "--out", str(out), "--queries-file",
           str(queries_path), "--result", str(result_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result_path.read_text())


def run_benchmark(n: int, dims: int, *, work: Path, nq: int = 1000, shard_size: int = 50_000, seed: int = 0,
                  methods: tuple[str, ...] = ("auto", "flat", "ivf-default")) -> dict[str, Any]:
    """Generate the corpus and queries, run each method in a child process, return all numbers."""
    import faiss

    from pipeline.index import vectors as vec

    out = work / "output"
    source = ClusteredSource(dims, max(8, n // 500), seed)
    t0 = time.perf_counter()
    if not (out / "vectors").exists():
        _write_corpus(out, n, dims, source, shard_size, seed)
    gen_seconds = time.perf_counter() - t0
    queries = source.sample(nq, np.random.default_rng([seed, 10**6]))
    t0 = time.perf_counter()
    _, truth = vec.exact_search(vec.complete_parts(out), queries, 100, "ip")
    truth_seconds = time.perf_counter() - t0
    queries_path = work / "queries.npz"
    np.savez(queries_path, queries=queries, truth=truth)
    results = [_child(m, out, queries_path, work) for m in methods]
    return {"n": n, "dims": dims, "queries": nq, "cpu_count": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(), "faiss_version": faiss.__version__,
            "generate_seconds": round(gen_seconds, 1), "ground_truth_seconds": round(truth_seconds, 1),
            "vectors": "clustered mixture (see pipeline/bench/index.py docstring)", "results": results}


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    head = f"{'method':<12} {'factory':<22} {'params':<14} {'build s':>8} {'peak RSS':>9} {'index':>9} " \
           f"{'recall@10':>9} {'q/s':>9}"
    lines = [f"{report['n']:,} vectors x {report['dims']} dims, {report['queries']} fresh queries, "
             f"{report['cpu_count']} CPUs, faiss {report['faiss_version']}", head, "-" * len(head)]
    for r in report["results"]:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(f"{r['method']:<12} {r['factory']:<22} {params:<14} {r['build_seconds']:>8.1f} "
                     f"{r['peak_rss_bytes'] / 2**30:>8.2f}G {r['size_bytes'] / 2**30:>8.2f}G "
                     f"{r['recall@10']:>9.4f} {r['qps']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None, help="Keep the corpus here (default: a temp dir).")
    parser.add_argument("--json", type=Path, default=Path("bench_index.json"), help="Where to write the numbers.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        _run_method(args.child, args.out, args.queries_file, args.result)
        return 0
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        report = run_benchmark(args.n, args.dims, work=args.work, nq=args.queries)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
            report = run_benchmark(args.n, args.dims, work=Path(tmp), nq=args.queries)
    args.json.write_text(json.dumps(report, indent=1))
    print(format_table(report))  # noqa: T201 - the benchmark's output
    print(f"numbers written to {args.json}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
