"""Query-side recall: the index's recall for vectors embedded the way the job embeds search queries.

Held-out corpus vectors are documents; with a query instruction (Qwen3-Embedding's ``Instruct: ...\\nQuery:``) or a
model ``query`` prompt, real queries land elsewhere in the space, and an ``nprobe`` tuned on documents may serve
them less well. So where the job recorded one, a random sample of the corpus's texts, cut to their first
``QUERY_CHARS`` characters (query-like length), is embedded through the job's query embedder
(``pipeline.job.record.query_embedder``) and searched: recall@1/10/100 against exact search over the live
vectors, at the tuned search parameters, reported beside the held-out figures (never tuned on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.index.params import Filter
from pipeline.index.recall import RECALL_KS, QuerySet, measure
from pipeline.index.vectors import LOCATOR_COLUMNS, Part

log = logging.getLogger(__name__)

QUERY_CHARS = 200
DEFAULT_QUERIES = 1000


def query_prompt(job: dict[str, Any]) -> str | None:
    """The job's query instruction, else its model's ``query`` prompt, else None."""
    cfg, model = job.get("config") or {}, job.get("model") or {}
    if cfg.get("query_instruction"):
        return str(cfg["query_instruction"])
    prompt = (model.get("prompts") or {}).get("query")
    return str(prompt) if prompt else None


def sample_texts(output: Path, job: dict[str, Any], parts: Sequence[Part], count: int,
                 rng: np.random.Generator) -> list[str]:
    """Texts of ``count`` random rows of ``parts``, read back from the inputs, cut to ``QUERY_CHARS``."""
    from pipeline.index.search import TextSource

    sizes = np.array([p.rows for p in parts], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.sort(rng.choice(int(bounds[-1]), min(count, int(bounds[-1])), replace=False))
    which = np.searchsorted(bounds, rows, side="right") - 1
    tables = []
    for i in np.unique(which):
        part = parts[int(i)]
        local = rows[which == i] - bounds[i]
        cols = ["id", *[c for c in LOCATOR_COLUMNS if c in part.columns]]
        table = pq.read_table(part.path, columns=cols).take(pa.array(local))
        table = table.append_column("shard", pa.array(np.full(len(local), part.shard, dtype=np.int32)))
        tables.append(table.append_column("row", pa.array(local.astype(np.int32))))
    texts, _ = TextSource(output, job).lookup(pa.concat_tables(tables))
    return [t[:QUERY_CHARS] for t in texts if t and t.strip()]


def query_side_recall(output: str | Path, index, parts: Sequence[Part], starts: Sequence[int], metric: str,
                      search_params: dict[str, Any], *, count: int | None = None, filt: Filter | None = None,
                      seed: int = 0, embedder=None) -> dict[str, Any] | None:
    """Recall@1/10/100 of ``index`` for corpus texts embedded as queries (see the module docstring).

    Args:
        output: the job's output directory (``job.json``, manifest and inputs are read).
        index: the index, set to its tuned parameters.
        parts, starts: the live parts and their first positions.
        metric: ``ip`` or ``l2``.
        search_params: the tuned ``nprobe``/``efSearch``.
        count: texts to embed (None: ``DEFAULT_QUERIES`` when the job recorded a query instruction or prompt, else
            nothing is measured; 0: nothing).
        filt: positions to leave out.
        seed: seed of the text sample.
        embedder: a query embedder (default: ``query_embedder(output)``).

    Returns:
        ``{"queries", "recall@1", "recall@10", "recall@100", "instruction", "text_chars", "seconds"}``,
        ``{"skipped": why}`` when it could not be measured, or None when there is nothing to measure (no job
        record, no query instruction and no count asked, or ``count == 0``).
    """
    from pipeline.index import vectors as vec
    from pipeline.job.record import query_embedder

    out = Path(output)
    if count == 0 or not (out / "job.json").exists():
        return None
    from pipeline.job.record import read_job_record

    job = read_job_record(out)
    prompt = query_prompt(job)
    if count is None:
        if prompt is None:
            return None
        count = DEFAULT_QUERIES
    t0 = time.perf_counter()
    try:
        texts = sample_texts(out, job, parts, count, np.random.default_rng([seed, 7]))
        if not texts:
            return {"skipped": "the texts of the indexed vectors cannot be read from the inputs"}
        embedder = embedder or query_embedder(out)
        qv = embedder.embed_texts(texts)
    except (PipelineError, OSError, ValueError, RuntimeError) as exc:
        log.warning("query-side recall not measured: %s", exc)
        return {"skipped": str(exc)}
    t_embed = time.perf_counter() - t0
    live = sum(p.rows for p in parts)
    kmax = int(min(max(RECALL_KS), live))
    qs = QuerySet(np.ascontiguousarray(qv, dtype=np.float32), np.full(len(qv), -1, dtype=np.int64), metric=metric)
    qs.truth_scores, qs.truth = vec.exact_search(parts, qs.vectors, kmax, metric, starts=starts)
    rec = measure(index, qs, kmax, search_params, filt)
    return {"queries": len(texts), **rec, "instruction": prompt, "text_chars": QUERY_CHARS,
            "seconds": {"embed": round(t_embed, 3), "measure": round(time.perf_counter() - t0 - t_embed, 3)},
            "what": f"{len(texts)} corpus texts cut to {QUERY_CHARS} characters, embedded through the job's query "
                    "embedder, searched at the tuned parameters; exact neighbours among the live vectors"}
