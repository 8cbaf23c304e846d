"""Retrieval metrics with exactly the definitions of trec_eval / pytrec_eval, as BEIR and MTEB report them.

A *run* maps each query id to ``{doc_id: score}``; *qrels* map each query id to ``{doc_id: relevance}``
(integers; BEIR's ``qrels/test.tsv``). As in trec_eval (``form_res_rels.c``):

* a query's retrieved documents are ranked by score, descending, ties broken by document id in *descending*
  byte order (``strcmp(b, a)``), whatever order they were given in;
* a document is relevant when its relevance is >= 1; negative relevances are "judged unjudged" and count
  nowhere;
* only queries present in both the run and the qrels are evaluated, and the mean is over those queries
  (pytrec_eval's behaviour, which BEIR and MTEB average); a query whose qrels hold no relevant document scores 0.

Measures (``k`` = cutoff):

* ``ndcg@k`` (trec_eval ``ndcg_cut.k``): gain = the relevance value (linear, not ``2^rel - 1``), discount
  ``log2(rank + 1)`` for 1-based rank, so rank 1 is undiscounted; ideal DCG from all judged relevances of the
  query sorted descending, cut at ``k``; 0 when the ideal DCG is 0.
* ``recall@k`` (``recall.k``): relevant documents in the top k / all relevant documents of the query.
* ``mrr@k`` (``recip_rank`` of the run cut at k): 1 / rank of the first relevant document in the top k, else 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_MEASURES = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def ranked(doc_scores: Mapping[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, ties by doc id descending.

    Python compares ``str`` by code point, which is the byte order of their UTF-8 encodings, as ``strcmp``.
    """
    return [doc for doc, _ in sorted(doc_scores.items(), key=lambda item: (float(item[1]), item[0]), reverse=True)]


def ndcg_at(rels: list[int], judged: Iterable[int], k: int) -> float:
    """nDCG@k of one ranking.

    Args:
        rels: relevance of each retrieved document in rank order (0 for unjudged ones).
        judged: every judged relevance of the query (the qrels values), for the ideal DCG.
        k: cutoff.
    """
    dcg = sum(r / math.log2(i + 2) for i, r in enumerate(rels[:k]) if r > 0)
    ideal = sorted((r for r in judged if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(rels: list[int], n_relevant: int, k: int) -> float:
    """Recall@k: relevant (>= 1) documents in the top k over the query's relevant documents (0 if none)."""
    if n_relevant == 0:
        return 0.0
    return sum(1 for r in rels[:k] if r >= 1) / n_relevant


def mrr_at(rels: list[int], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top k (0 if none)."""
    for i, r in enumerate(rels[:k]):
        if r >= 1:
            return 1.0 / (i + 1)
    return 0.0


def _parse(measure: str) -> tuple[str, int]:
    name, _, k = measure.partition("@")
    if name not in ("ndcg", "recall", "mrr") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown measure {measure!r} (use ndcg@K, recall@K or mrr@K)")
    return name, int(k)


def evaluate_query(qrels: Mapping[str, int], doc_scores: Mapping[str, float],
                   measures: Iterable[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """All ``measures`` for one query."""
    order = ranked(doc_scores)
    rels = [int(qrels.get(doc, 0)) for doc in order]
    judged = [int(r) for r in qrels.values() if int(r) >= 0]
    n_relevant = sum(1 for r in judged if r >= 1)
    out = {}
    for measure in measures:
        name, k = _parse(measure)
        if name == "ndcg":
            out[measure] = ndcg_at(rels, judged, k)
        elif name == "recall":
            out[measure] = recall_at(rels, n_relevant, k)
        else:
            out[measure] = mrr_at(rels, k)
    return out


def evaluate(qrels: Qrels, run: Run, measures: Iterable[str] = DEFAULT_MEASURES,
             *, ignore_identical_ids: bool = False) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query measures over the queries present in both ``run`` and ``qrels``.

    Args:
        qrels: relevance judgements.
        run: retrieved documents and scores.
        measures: e.g. ``("ndcg@10", "recall@100")``.
        ignore_identical_ids: drop a retrieved document whose id equals the query id first (BEIR's option, for
            sets such as ArguAna and Quora where queries are also documents).

    Returns:
        ``(mean by measure, {query id: {measure: value}})``; means are 0.0 when no query is evaluated.

    Example:
        >>> evaluate({"q": {"a": 1}}, {"q": {"a": 0.9, "b": 0.5}}, ["mrr@10"])[0]
        {'mrr@10': 1.0}
    """
    measures = list(measures)
    for m in measures:
        _parse(m)
    per_query: dict[str, dict[str, float]] = {}
    for qid, doc_scores in run.items():
        if qid not in qrels:
            continue
        if ignore_identical_ids:
            doc_scores = {d: s for d, s in doc_scores.items() if d != qid}
        per_query[qid] = evaluate_query(qrels[qid], doc_scores, measures)
    n = len(per_query)
    mean = {m: (sum(q[m] for q in per_query.values()) / n if n else 0.0) for m in measures}
    return mean, per_query
