"""Index benchmarks: the automatic choice against a flat index and a plain IVF-Flat; and an index past one
process's memory budget, built in pieces with its lists on disk.

``python -m pipeline.bench.index --n 1000000 --dims 384`` (the comparison) writes ``n`` vectors as the vector parts of
a synthetic output directory, then, in one run and each in its own process (so peak memory is measured per method):

* ``auto``: ``build_index`` with the default budget (its choice, training sample, streaming add, nprobe/efSearch
  tuned to recall@10 >= 0.95 on one set of held-out corpus vectors, recall reported on another);
* ``flat``: ``IndexFlatIP``, exact;
* ``ivf-wiki``: ``IVF{sqrt n},Flat`` the way a user following the faiss wiki builds it: trained on a random
  sample of 256 vectors per list (what faiss's k-means keeps of a larger training set), vectors added in batches,
  ``nprobe=1`` (faiss's default).

``python -m pipeline.bench.index --pieces 2 --n 10000000 --dims 128 --max-memory 1G`` (the scale run) builds the
index the way a cluster would, on this machine: ``embed-corpus index build --pieces 2 --workers 2 --max-memory 1G``
in a child process (training and merge in it, the two pieces in two more), while a monitor samples the memory of
every process of the tree; then a search process opens the index (lists memory-mapped) and answers the queries. It
reports the time of each stage, the peak memory of each process (``VmHWM``, which counts the pages of memory-mapped
files the process touched, and the sampled peak of its anonymous memory, which is what the budget bounds), the
memory of a bare Python process with numpy, pyarrow and faiss imported (the overhead outside the budget), the index
size on disk, recall and queries/s.

Queries: both runs score each index on 1,000 *fresh* queries drawn from the same distribution as the corpus (not
corpus vectors, never in any index): recall@10 and @100 against exact search over all vectors, and queries/s for one
batch of them on all cores (best of 3). The ``auto`` rows also carry the recall ``build_index`` recorded on its
held-out corpus vectors (the report set). Peak memory is the process's ``VmHWM``; build time includes reading the
vectors from Parquet. A table is printed and every number is written as JSON by the run itself.

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
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.index.pieces import peak_rss_bytes
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


def _qps(index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Queries per second of one batch search over all cores, best of ``repeats`` (the machine may be shared)."""
    index.search(queries[:10], k)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, ids


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    from pipeline.index.recall import recall_at

    return recall_at(found[:, :k], truth[:, :k], k)


def _run_method(method: str, out: str, queries_path: str, result_path: str) -> None:
    """Child process: build one index, measure it, write a JSON result."""
    import faiss

    from pipeline.index import vectors as vec

    data = np.load(queries_path)
    queries, truth = data["queries"], data["truth"]
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"method": method}
    if method == "auto":
        from pipeline.index.files import load_index
        from pipeline.index.store import build_index

        info = build_index(out)
        index, _ = load_index(out)
        result.update(factory=info["factory"], reason=info["choice"]["reason"], params=info["search_params"],
                      info_recall1=info["recall@1"], info_recall10=info["recall@10"],
                      info_recall100=info["recall@100"], info_queries=info["recall_queries"],
                      train_seconds=info["trained"].get("seconds"), size_bytes=info["size_bytes"],
                      phases={"read_sample": info["trained"].get("sample_read_seconds"),
                              "train": info["trained"].get("seconds"), "steps": info["steps"],
                              "ground_truth": info["tuning"]["ground_truth_seconds"],
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
            # the faiss wiki's recipe: train on a representative sample (k-means keeps 256 per list of a larger
            # one), add the rest in batches, search with faiss's default nprobe 1
            rng = np.random.default_rng(0)
            sample = vec.read_rows(parts, np.sort(rng.choice(n, min(n, 256 * nlist), replace=False)))
            t_train = time.perf_counter()
            index.train(sample)
            result.update(factory=f"IVF{nlist},Flat", params={"nprobe": 1}, train_vectors=len(sample),
                          train_seconds=round(time.perf_counter() - t_train, 2))
            del sample
        for p in parts:
            for x, _ in vec.iter_batches(p):
                index.add(x)
        with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
            faiss.write_index(index, f.name)
            result["size_bytes"] = os.path.getsize(f.name)
    result["build_seconds"] = round(time.perf_counter() - t0, 2)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["rss_before_bytes"] = base_rss
    qps, found = _qps(index, queries, 100)
    result["qps"] = round(qps, 1)
    result["qps_k"] = 100
    result["recall@10"] = round(_recall(found, truth, 10), 4)
    result["recall@100"] = round(_recall(found, truth, 100), 4)
    Path(result_path).write_text(json.dumps(result))


def _child(method: str, out: Path, queries_path: Path, work: Path) -> dict[str, Any]:
    result_path = work / f"result-{method}.json"
    cmd = [sys.executable, "-m", "pipeline.bench.index", "--child", method, "--out", str(out), "--queries-file",
           str(queries_path), "--result", str(result_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result_path.read_text())


def _corpus_and_truth(work: Path, n: int, dims: int, nq: int, shard_size: int, seed: int
                      ) -> tuple[Path, Path, float, float]:
    """The clustered corpus as an output (made once, reused by later runs in ``work``) and fresh queries with their
    exact top 100. Returns (output, queries file, seconds to generate, seconds of the exact search)."""
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
    return out, queries_path, gen_seconds, truth_seconds


def run_benchmark(n: int, dims: int, *, work: Path, nq: int = 1000, shard_size: int = 50_000, seed: int = 0,
                  methods: tuple[str, ...] = ("auto", "flat", "ivf-wiki")) -> dict[str, Any]:
    """Generate the corpus and queries, run each method in a child process, return all numbers."""
    import faiss


    out, queries_path, gen_seconds, truth_seconds = _corpus_and_truth(work, n, dims, nq, shard_size, seed)
    results = [_child(m, out, queries_path, work) for m in methods]
    return {"n": n, "dims": dims, "queries": nq, "cpu_count": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(), "faiss_version": faiss.__version__,
            "generate_seconds": round(gen_seconds, 1), "ground_truth_seconds": round(truth_seconds, 1),
            "vectors": "clustered mixture (see pipeline/bench/index.py docstring)",
            "queries_are": f"{nq} fresh vectors from the same mixture, not in any index; exact top-100 over all "
                           "vectors as ground truth",
            "results": results}


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    head = f"{'method':<12} {'factory':<22} {'params':<14} {'build s':>8} {'peak RSS':>9} {'index':>9} " \
           f"{'recall@10':>9} {'@100':>7} {'q/s':>9}"
    lines = [f"{report['n']:,} vectors x {report['dims']} dims, {report['queries']} fresh queries, "
             f"{report['cpu_count']} CPUs, faiss {report['faiss_version']}", head, "-" * len(head)]
    for r in report["results"]:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(f"{r['method']:<12} {r['factory']:<22} {params:<14} {r['build_seconds']:>8.1f} "
                     f"{r['peak_rss_bytes'] / 2**30:>8.2f}G {r['size_bytes'] / 2**30:>8.2f}G "
                     f"{r['recall@10']:>9.4f} {r.get('recall@100', float('nan')):>7.4f} {r['qps']:>9.0f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- scale run


def _status(pid: int) -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile`` of a process in bytes (empty once it has exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return kids


class TreeMonitor(threading.Thread):
    """Samples the memory of a process and all its descendants every ``interval`` seconds: per process image (a
    process that execs another program starts a new record), the last ``VmHWM`` seen (the kernel's peak of
    resident memory, memory-mapped file pages included) and the sampled peaks of anonymous and file-backed
    resident memory."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[tuple[int, str], dict[str, Any]] = {}
        self._current: dict[int, tuple[int, str]] = {}
        self._halt = threading.Event()

    def _sample(self, pid: int) -> None:
        st = _status(pid)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300].strip()
        except OSError:
            return
        if not st:
            return
        key = (pid, cmd)
        if self._current.get(pid, key) != key:  # exec: the image before it was a fork of its parent
            self.procs[self._current[pid]]["before_exec"] = True
        self._current[pid] = key
        rec = self.procs.setdefault(key, {"pid": pid, "cmd": cmd, "first_seen": time.time(), "peak_anon_bytes": 0,
                                          "peak_file_bytes": 0, "vm_hwm_bytes": 0, "before_exec": False})
        rec["last_seen"] = time.time()
        rec["vm_hwm_bytes"] = max(rec["vm_hwm_bytes"], st.get("VmHWM", 0))
        rec["peak_anon_bytes"] = max(rec["peak_anon_bytes"], st.get("RssAnon", 0))
        rec["peak_file_bytes"] = max(rec["peak_file_bytes"], st.get("RssFile", 0) + st.get("RssShmem", 0))

    def run(self) -> None:
        while not self._halt.is_set():
            todo, seen = [self.root], set()
            while todo:
                pid = todo.pop()
                if pid not in seen:
                    seen.add(pid)
                    self._sample(pid)
                    todo += _children(pid)
            self._halt.wait(self.interval)

    def stop(self) -> list[dict[str, Any]]:
        """The records of the process images that ran whole programs (forks caught before their exec left out)."""
        self._halt.set()
        self.join()
        return [r for r in self.procs.values() if not r["before_exec"]]


def _overhead_child(out: str, result_path: str) -> None:
    """Child: the resident memory of a process that has imported the index path (numpy, pyarrow, faiss) and
    streamed one vector part (the Parquet reader's buffers and what the allocators keep of them): what a process
    needs besides the index's budget."""
    import faiss  # noqa: F401

    import pipeline.index.store  # noqa: F401
    from pipeline.index import vectors as vec

    bare = _status(os.getpid())
    for _ in vec.iter_batches(vec.complete_parts(out)[0], 65536):
        pass
    st = _status(os.getpid())
    Path(result_path).write_text(json.dumps({"bare_rss_bytes": bare.get("VmRSS", 0),
                                             "bare_anon_bytes": bare.get("RssAnon", 0),
                                             "rss_bytes": st.get("VmRSS", 0), "anon_bytes": st.get("RssAnon", 0),
                                             "vm_hwm_bytes": st.get("VmHWM", 0)}))


def _search_child(out: str, queries_path: str, result_path: str) -> None:
    """Child: open the index as ``search`` does (lists memory-mapped), search the fresh queries at the tuned
    parameters, then at the other nprobe values of the tuning curve up to it (speed against recall); measure."""
    from pipeline.index.files import load_index, read_info, search_filter
    from pipeline.index.params import search

    data = np.load(queries_path)
    queries, truth = data["queries"], data["truth"]
    t0 = time.perf_counter()
    info = read_info(out)
    index, _ = load_index(out, info)
    filt, _, _ = search_filter(out, info)
    load_seconds = time.perf_counter() - t0
    k = 100

    def timed(params: dict[str, Any]) -> dict[str, Any]:
        search(index, queries[:10], k, params, filt)  # warm up
        times, found = [], None
        for _ in range(3):
            t = time.perf_counter()
            _, found = search(index, queries, k, params, filt)
            times.append(time.perf_counter() - t)
        return {**params, "qps": round(len(queries) / min(times), 1),
                "qps_first_pass": round(len(queries) / times[0], 1), "search_seconds": [round(t, 4) for t in times],
                "recall@10": round(_recall(found, truth, 10), 4), "recall@100": round(_recall(found, truth, 100), 4)}

    tuned = timed(info["search_params"])
    sweep = []
    param = info["tuning"].get("param")
    if param:
        chosen = info["search_params"][param]
        for point in info["tuning"]["curve"]:
            if 8 <= point[param] < chosen:
                sweep.append({**timed({param: point[param]}), "tune_set_recall@10": point["recall@10"],
                              "tune_set_recall@100": point["recall@100"]})
    st = _status(os.getpid())
    Path(result_path).write_text(json.dumps({
        "load_seconds": round(load_seconds, 3), "k": k, "search_params": info["search_params"], **tuned,
        "sweep": sweep, "vm_hwm_bytes": st.get("VmHWM", 0), "anon_bytes_at_end": st.get("RssAnon", 0),
        "file_bytes_at_end": st.get("RssFile", 0)}))


def run_pieces_benchmark(n: int, dims: int, *, work: Path, max_memory: str = "1G", pieces: int = 2, nq: int = 1000,
                         shard_size: int = 50_000, seed: int = 0, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scale run (see the module docstring): corpus, fresh queries and exact neighbours, the build in pieces
    under a memory monitor, a search process; every number in one report."""
    import faiss

    from pipeline.index.choice import parse_size

    out, queries_path, gen_seconds, truth_seconds = _corpus_and_truth(work, n, dims, nq, shard_size, seed)
    shutil.rmtree(out / "index", ignore_errors=True)

    overhead_path = work / "overhead.json"
    subprocess.run([sys.executable, "-m", "pipeline.bench.index", "--child", "overhead", "--out", str(out),
                    "--result", str(overhead_path)], check=True)
    overhead = json.loads(overhead_path.read_text())

    load_before = os.getloadavg()
    cmd = [sys.executable, "-m", "pipeline.cli", "index", "build", str(out), "--max-memory", max_memory,
           "--pieces", str(pieces), "--workers", str(pieces), "--json", *extra_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monitor = TreeMonitor(proc.pid)
    monitor.start()
    stdout, stderr = proc.communicate()
    build_wall = time.perf_counter() - t0
    procs = monitor.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"index build failed ({proc.returncode}):\n{stderr[-3000:]}")
    info = json.loads(stdout)

    search_path = work / "search.json"
    t0 = time.perf_counter()
    sproc = subprocess.Popen([sys.executable, "-m", "pipeline.bench.index", "--child", "search", "--out", str(out),
                              "--queries-file", str(queries_path), "--result", str(search_path)])
    smon = TreeMonitor(sproc.pid)
    smon.start()
    if sproc.wait() != 0:
        raise RuntimeError("the search process failed")
    search_procs = smon.stop()
    searched = json.loads(search_path.read_text())
    searched["wall_seconds"] = round(time.perf_counter() - t0, 2)

    budget = parse_size(max_memory)
    folder = out / "index"
    sizes = {name: (folder / info["files"][name]).stat().st_size for name in info["files"]}
    roles = []
    for rec in procs + search_procs:
        cmdline = rec["cmd"]
        role = ("search" if "--child search" in cmdline else "train+merge+recall (index build)"
                if "pipeline.cli" in cmdline else "piece (pool worker)" if "multiprocessing" in cmdline
                or "spawn_main" in cmdline else "other: " + cmdline[:60])
        if "resource_tracker" in cmdline:
            role = "multiprocessing resource tracker"
        roles.append({**rec, "role": role, "seconds": round(rec["last_seen"] - rec["first_seen"], 2),
                      "anon_within_budget": rec["peak_anon_bytes"] <= budget + overhead["anon_bytes"]})
    return {
        "kind": "pieces", "n": n, "dims": dims, "queries": nq, "max_memory": max_memory, "budget_bytes": budget,
        "pieces": pieces, "cpu_count": os.cpu_count(), "faiss_version": faiss.__version__,
        "vectors": "clustered mixture (see pipeline/bench/index.py docstring)",
        "queries_are": f"{nq} fresh vectors from the same mixture, not in the index; exact top-100 over all "
                       f"{n:,} vectors as ground truth",
        "command": " ".join(cmd[2:]),
        "generate_seconds": round(gen_seconds, 1), "ground_truth_seconds": round(truth_seconds, 1),
        "build_wall_seconds": round(build_wall, 2),
        "overhead": overhead,
        "processes": roles,
        "sizes_bytes": sizes,
        "info": {k: info.get(k) for k in ("factory", "on_disk", "search_params", "recall@1", "recall@10",
                                          "recall@100", "recall_queries", "tuning", "trained", "steps", "choice",
                                          "build_seconds", "write_seconds", "peak_rss_bytes", "live", "ntotal")},
        "search": searched,
        "load_average": {"before_build": load_before, "after_search": os.getloadavg(),
                         "note": "1-minute load of the shared 2-core machine: above 2, other work competed"},
    }


def format_pieces_table(r: dict[str, Any]) -> str:
    gib = 2**30
    info, s = r["info"], r["search"]
    steps = info["steps"]
    lines = [f"{r['n']:,} vectors x {r['dims']} dims, --max-memory {r['max_memory']}, {r['pieces']} pieces in "
             f"parallel, {r['cpu_count']} CPUs, faiss {r['faiss_version']}",
             f"index: {info['factory']} (lists on disk: {info['on_disk']}), {info['search_params']}",
             f"stages: train {steps['train'].get('seconds', 0):.1f}s, pieces "
             + ", ".join(f"{p['seconds']:.1f}s" for p in steps["pieces"])
             + f", merge {steps['merge']['seconds']:.1f}s, recall {steps['recall']['seconds']:.1f}s, write "
               f"{info['write_seconds']:.1f}s; build wall {r['build_wall_seconds']:.1f}s",
             f"overhead: a process that imported the index path and streamed one part holds "
             f"{r['overhead']['anon_bytes'] / gib:.2f}G anonymous ({r['overhead']['rss_bytes'] / gib:.2f}G resident)",
             f"{'process':<36} {'seconds':>8} {'VmHWM':>8} {'anon':>8} {'file':>8}"]
    for p in r["processes"]:
        lines.append(f"{p['role'][:36]:<36} {p['seconds']:>8.1f} {p['vm_hwm_bytes'] / gib:>7.2f}G "
                     f"{p['peak_anon_bytes'] / gib:>7.2f}G {p['peak_file_bytes'] / gib:>7.2f}G")
    size = sum(r["sizes_bytes"].values())
    files = ", ".join(f"{k} {v / gib:.2f}G" for k, v in r["sizes_bytes"].items())
    lines.append(f"on disk: {size / gib:.2f}G ({files})")
    lines.append(f"recall@10/@100: held-out corpus vectors (report set) {info['recall@10']:.4f}/"
                 f"{info['recall@100']:.4f}; fresh queries {s['recall@10']:.4f}/{s['recall@100']:.4f}; "
                 f"{s['qps']:.0f} queries/s at k=100")
    for point in s.get("sweep", []):
        lines.append(f"  nprobe {point['nprobe']}: fresh recall@10/@100 {point['recall@10']:.4f}/"
                     f"{point['recall@100']:.4f}, {point['qps']:.0f} queries/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None, help="Keep the corpus here (default: a temp dir).")
    parser.add_argument("--json", type=Path, default=Path("bench_index.json"), help="Where to write the numbers.")
    parser.add_argument("--pieces", type=int, default=0,
                        help="Run the scale benchmark: build in this many pieces in parallel (lists on disk when "
                             "they do not fit --max-memory).")
    parser.add_argument("--max-memory", default="1G", help="Budget of the scale benchmark's processes.")
    parser.add_argument("--shard-size", type=int, default=50_000, help="Vectors per part.")
    parser.add_argument("--recall-k", default="10", choices=["1", "10", "100"],
                        help="The scale benchmark's `index build --recall-k` (the k nprobe is tuned for).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child == "overhead":
        _overhead_child(args.out, args.result)
        return 0
    if args.child == "search":
        _search_child(args.out, args.queries_file, args.result)
        return 0
    if args.child:
        _run_method(args.child, args.out, args.queries_file, args.result)
        return 0

    def one(work: Path) -> dict[str, Any]:
        if args.pieces:
            return run_pieces_benchmark(args.n, args.dims, work=work, max_memory=args.max_memory, pieces=args.pieces,
                                        nq=args.queries, shard_size=args.shard_size,
                                        extra_args=("--recall-k", args.recall_k))
        return run_benchmark(args.n, args.dims, work=work, nq=args.queries, shard_size=args.shard_size)

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        report = one(args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
            report = one(Path(tmp))
    report["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        report["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        report["commit"] = None
    args.json.write_text(json.dumps(report, indent=1))
    print(format_pieces_table(report) if args.pieces else format_table(report))  # noqa: T201 - the output
    print(f"numbers written to {args.json}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
