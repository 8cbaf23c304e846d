"""Retrieval metrics: hand-computed values (ties, graded and negative qrels), and pytrec_eval where installed."""

from __future__ import annotations

import math
import random

import pytest

from pipeline.index.metrics import evaluate, evaluate_query, ranked


def test_graded_qrels_and_a_score_tie_by_hand() -> None:
    qrels = {"q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1}}
    # d2 and d5 tie at 0.9: trec_eval puts the larger doc id first, so the order is d5, d2, d3, d1, d6
    run = {"q1": {"d1": 0.5, "d2": 0.9, "d5": 0.9, "d3": 0.7, "d6": 0.1}}
    assert ranked(run["q1"]) == ["d5", "d2", "d3", "d1", "d6"]
    mean, per_query = evaluate(qrels, run, ["ndcg@10", "ndcg@2", "recall@10", "recall@2", "mrr@10", "mrr@1"])
    dcg = 1 / math.log2(3) + 2 / math.log2(5)  # d2 (rel 1) at rank 2, d1 (rel 2) at rank 4
    idcg = 2 + 1 / math.log2(3) + 1 / math.log2(4)  # ideal order of the judged relevances 2, 1, 1
    assert mean["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-12)
    assert mean["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (2 + 1 / math.log2(3)), abs=1e-12)
    assert mean["recall@10"] == pytest.approx(2 / 3)
    assert mean["recall@2"] == pytest.approx(1 / 3)
    assert mean["mrr@10"] == 0.5
    assert mean["mrr@1"] == 0.0
    assert per_query["q1"]["ndcg@10"] == mean["ndcg@10"]


def test_ties_are_broken_by_doc_id_descending_not_input_order() -> None:
    qrels = {"q": {"a": 1}}
    for run in ({"q": {"a": 1.0, "b": 1.0}}, {"q": {"b": 1.0, "a": 1.0}}):
        assert evaluate(qrels, run, ["mrr@10"])[0]["mrr@10"] == 0.5  # b before a
    assert ranked({"item10": 1.0, "item9": 1.0, "item2": 1.0}) == ["item9", "item2", "item10"]  # bytes, not numbers


def test_queries_without_relevant_docs_count_as_zero_and_only_shared_queries_are_averaged() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}, "q3": {"c": 1}}
    run = {"q1": {"a": 0.9}, "q2": {"b": 0.9}, "q4": {"a": 0.5}}  # q3 not retrieved, q4 not judged
    mean, per_query = evaluate(qrels, run, ["ndcg@10", "recall@10", "mrr@10"])
    assert set(per_query) == {"q1", "q2"}
    assert per_query["q2"] == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}
    assert mean == {"ndcg@10": 0.5, "recall@10": 0.5, "mrr@10": 0.5}


def test_negative_relevance_is_ignored_and_cutoffs_apply() -> None:
    qrels = {"a": -1, "b": 1, "c": 3}
    scores = {"a": 0.9, "b": 0.8, "x": 0.7, "c": 0.1}
    got = evaluate_query(qrels, scores, ["ndcg@3", "recall@3", "recall@100", "mrr@10"])
    # ranks: a (unjudged), b (1), x (0), c (3)
    assert got["ndcg@3"] == pytest.approx((1 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert got["recall@3"] == 0.5
    assert got["recall@100"] == 1.0
    assert got["mrr@10"] == 0.5


def test_identical_ids_can_be_ignored() -> None:
    qrels = {"q": {"d": 1}}
    run = {"q": {"q": 0.99, "d": 0.5}}
    assert evaluate(qrels, run, ["mrr@10"])[0]["mrr@10"] == 0.5
    assert evaluate(qrels, run, ["mrr@10"], ignore_identical_ids=True)[0]["mrr@10"] == 1.0


def test_unknown_measure_raises() -> None:
    with pytest.raises(ValueError, match="unknown measure"):
        evaluate({}, {}, ["map@10"])


def test_equal_to_pytrec_eval_on_random_runs_with_ties() -> None:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(200):
        judged = rng.sample(docs, rng.randint(1, 15))
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 1, 2, 3, -1]) for d in judged}
        run[f"q{q}"] = {d: rng.choice([0.1, 0.5, 0.5, 0.9, rng.random()]) for d in rng.sample(docs, rng.randint(1, 50))}
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10", "recall.100"}).evaluate(run)
    cut = {q: {d: run[q][d] for d in ranked(run[q])[:10]} for q in run}  # MRR@10 = recip_rank of the top 10
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    _, mine = evaluate(qrels, run)
    assert set(mine) == set(ref)
    for q in ref:
        assert mine[q]["ndcg@10"] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-12)
        assert mine[q]["recall@10"] == pytest.approx(ref[q]["recall_10"], abs=1e-12)
        assert mine[q]["recall@100"] == pytest.approx(ref[q]["recall_100"], abs=1e-12)
        assert mine[q]["mrr@10"] == pytest.approx(ref_rr[q]["recip_rank"], abs=1e-12)
