"""Evaluate: BEIR-style retrieval scores for an embedded corpus, exact search and the index side by side.

Inputs are in the BEIR layout: ``queries.jsonl`` (``{"_id", "text"}`` per line) and ``qrels/{split}.tsv``
(``query-id  corpus-id  score`` with a header line). The corpus must be the job's input, embedded with its
document ids as ids (for BEIR: ``--id-field _id --text-field "{title} {text}"``, the title and the text joined by a
space as MTEB does).

For every query that has qrels in the split, the top ``depth`` (100) documents are retrieved

* exactly: brute force over the very vectors the index holds (streamed part by part);
* through the index with its recorded search parameters;
* and, with a reranker, from the index's top ``rerank_top`` re-ordered by the reranker,

and nDCG@10, Recall@10, Recall@100 and MRR@10 are computed with the trec_eval definitions
(``pipeline.metrics``). With chunked documents a document's score is its best chunk's (MaxP). The table is
printed and the report is written to ``OUTPUT/eval/{name}-{split}.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.index.metrics import DEFAULT_MEASURES, evaluate
from pipeline.util import write_json_atomic

log = logging.getLogger(__name__)

DEPTH = 100


def load_queries(path: str | Path) -> dict[str, str]:
    """BEIR ``queries.jsonl`` -> ``{query id: text}``.

    Raises:
        PipelineError: missing file or a bad line (the line is named).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--queries {path}: no such file")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                qid, text = obj["_id"], obj["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PipelineError(f"{path}: line {lineno}: expected a JSON object with '_id' and 'text'") from exc
            out[str(qid)] = str(text)
    return out


def qrels_path(qrels: str | Path, split: str) -> Path:
    """A qrels file, or ``DIR/{split}.tsv`` when a directory (BEIR's ``qrels/``) is given."""
    path = Path(qrels)
    if path.is_dir():
        path = path / f"{split}.tsv"
    if not path.is_file():
        raise PipelineError(f"--qrels: {path} does not exist")
    return path


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (header ``query-id corpus-id score``) -> ``{query id: {doc id: relevance}}``.

    Raises:
        PipelineError: a line without three fields or with a non-integer score.
    """
    path = Path(path)
    out: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid")):
                continue
            if len(row) < 3:
                raise PipelineError(f"{path}: line {lineno}: expected query-id, corpus-id and score")
            try:
                score = int(float(row[2]))
            except ValueError as exc:
                raise PipelineError(f"{path}: line {lineno}: score {row[2]!r} is not a number") from exc
            out.setdefault(row[0], {})[row[1]] = score
    return out


def _doc_keys(searcher, positions: np.ndarray) -> list[str]:
    rows = searcher.ids.take(positions)
    name = "doc_id" if "doc_id" in rows.column_names else "id"
    return rows.column(name).to_pylist()


def _run_from(searcher, qids: list[str], scores: np.ndarray, positions: np.ndarray) -> dict[str, dict[str, float]]:
    """Turn search output into a trec-style run (doc id -> best score; chunks fold into their document)."""
    run: dict[str, dict[str, float]] = {}
    for i, qid in enumerate(qids):
        valid = positions[i] >= 0
        docs = _doc_keys(searcher, positions[i][valid])
        best: dict[str, float] = {}
        for doc, s in zip(docs, scores[i][valid].tolist(), strict=True):
            if doc not in best or s > best[doc]:
                best[doc] = s
        run[qid] = best
    return run


def _rerank_run(searcher, reranker, qids: list[str], texts: list[str], scores: np.ndarray, positions: np.ndarray,
                top: int) -> dict[str, dict[str, float]]:
    """The first stage's ranking with its top ``top`` re-ordered by the reranker; the rest keeps its order below."""
    run: dict[str, dict[str, float]] = {}
    for i, qid in enumerate(qids):
        valid = positions[i] >= 0
        pos, first = positions[i][valid], scores[i][valid]
        head = min(top, len(pos))
        rows = searcher.ids.take(pos[:head])
        cand_texts, _ = searcher.texts.lookup(rows)
        if any(t is None for t in cand_texts):
            raise PipelineError("cannot rerank: some candidate texts cannot be read from the inputs")
        rr = reranker.score(texts[i], cand_texts).astype(np.float64)
        keys = _doc_keys(searcher, pos)
        best: dict[str, float] = {}
        for doc, s in zip(keys[:head], rr.tolist(), strict=True):
            best[doc] = max(s, best.get(doc, -np.inf))
        if head < len(pos):
            # below every reranked score, in first-stage order
            shift = (min(best.values()) - 1.0) - float(first[head])
            for doc, s in zip(keys[head:], first[head:].tolist(), strict=True):
                best.setdefault(doc, s + shift)
        run[qid] = best
    return run


def run_eval(
    output: str | Path,
    queries: str | Path,
    qrels: str | Path,
    *,
    split: str = "test",
    depth: int = DEPTH,
    rerank_model: str | None = None,
    rerank_top: int = 100,
    rerank_instruction: str | None = None,
    device: str | None = None,
    ignore_identical_ids: bool = False,
    name: str | None = None,
    searcher=None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score exact search, the index (and the reranked index) on BEIR-layout queries and qrels.

    Args:
        output: the job's output directory, with an index (``embed-corpus index build``).
        queries: ``queries.jsonl``.
        qrels: a qrels TSV, or the ``qrels/`` directory (then ``{split}.tsv`` in it).
        split: the qrels split when ``qrels`` is a directory.
        depth: documents retrieved per query (>= 100 for Recall@100).
        rerank_model: a reranker to add a third column.
        rerank_top: candidates the reranker re-scores.
        rerank_instruction: the Qwen3-Reranker instruction.
        device: where the models run.
        ignore_identical_ids: drop a retrieved document whose id equals the query id (BEIR's option).
        name: report name (default: the dataset folder's name).
        searcher: a ready ``Searcher`` (tests).

    Returns:
        The report: ``{"queries": n, "columns": {"exact": {...}, "index": {...}[, "index+rerank": {...}]}, ...}``
        with measures ``ndcg@10``, ``recall@10``, ``recall@100``, ``mrr@10``; also written as JSON under
        ``OUTPUT/eval/``.

    Raises:
        PipelineError: missing index or files, or no query with qrels.
    """
    from pipeline.index import vectors as vec
    from pipeline.index.search import Searcher

    out = Path(output)
    queries_all = load_queries(queries)
    qrel_file = qrels_path(qrels, split)
    judgements = load_qrels(qrel_file)
    qids = [q for q in judgements if q in queries_all]
    if not qids:
        raise PipelineError(f"no query of {queries} has qrels in {qrel_file}")
    missing = len(judgements) - len(qids)
    if missing:
        log.warning("%d queries of %s are not in %s; they are left out", missing, qrel_file, queries)
    searcher = searcher or Searcher(out, device=device, trust_remote_code=trust_remote_code)
    texts = [queries_all[q] for q in qids]
    t0 = time.perf_counter()
    qv = searcher.embed(texts)
    embed_seconds = time.perf_counter() - t0
    k = depth + (1 if ignore_identical_ids else 0)
    parts, starts = searcher.live_parts, searcher.live_starts  # the indexed vectors still in the output
    indexed = {(e["name"], e["finished_at"]) for e in searcher.info["parts"]}
    unindexed = [p for p in vec.complete_parts(out) if (p.name, p.finished_at) not in indexed]
    if unindexed:
        log.warning("%d finished parts are not in the index yet (run `embed-corpus index update`); both columns "
                    "use the indexed parts only", len(unindexed))
    t0 = time.perf_counter()
    dist, pos = vec.exact_search(parts, qv, k, searcher.metric, starts=starts)
    exact_seconds = time.perf_counter() - t0
    exact_scores = dist if searcher.metric == "ip" else -dist
    t0 = time.perf_counter()
    index_scores, index_pos = searcher.search_vectors(qv, k)
    index_seconds = time.perf_counter() - t0
    runs = {"exact": _run_from(searcher, qids, exact_scores, pos),
            "index": _run_from(searcher, qids, index_scores, index_pos)}
    timings = {"embed_queries": embed_seconds, "exact": exact_seconds, "index": index_seconds}
    if rerank_model:
        from pipeline.model.rerank import load_reranker

        reranker = load_reranker(rerank_model, device=device, instruction=rerank_instruction)
        t0 = time.perf_counter()
        runs["index+rerank"] = _rerank_run(searcher, reranker, qids, texts, index_scores, index_pos, rerank_top)
        timings["rerank"] = time.perf_counter() - t0
    columns = {}
    for col, run in runs.items():
        mean, _ = evaluate(judgements, run, DEFAULT_MEASURES, ignore_identical_ids=ignore_identical_ids)
        columns[col] = {m: round(v, 6) for m, v in mean.items()}
    name = name or Path(queries).resolve().parent.name or "queries"
    report = {
        "name": name,
        "split": split,
        "queries": len(qids),
        "queries_file": str(queries),
        "qrels_file": str(qrel_file),
        "depth": depth,
        "ignore_identical_ids": ignore_identical_ids,
        "measures": list(DEFAULT_MEASURES),
        "columns": columns,
        "index": {"factory": searcher.info["factory"], "search_params": searcher.info["search_params"],
                  "ntotal": searcher.info["ntotal"], "live": sum(p.rows for p in parts),
                  "filtered": searcher.filter.count, "on_disk": bool(searcher.info.get("on_disk"))},
        "model": searcher.job["config"]["model"],
        "rerank": {"model": rerank_model, "top": rerank_top, "instruction": rerank_instruction} if rerank_model
        else None,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "evaluated_at": time.time(),
    }
    folder = out / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{split}.json"
    write_json_atomic(path, report)
    report["path"] = str(path)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's measures as a table: one row per measure, one column per retrieval."""
    cols = list(report["columns"])
    label = {"index": f"index ({report['index']['factory']})"}
    heads = [label.get(c, c) for c in cols]
    width = max(12, *(len(h) for h in heads))
    lines = [f"{report['name']} ({report['split']}): {report['queries']} queries",
             f"{'measure':<12}" + "".join(f"{h:>{width + 2}}" for h in heads)]
    for m in report["measures"]:
        lines.append(f"{m:<12}" + "".join(f"{report['columns'][c][m]:>{width + 2}.4f}" for c in cols))
    return "\n".join(lines)
