"""The FAISS index: choice under a budget, measured recall, update, atomic rebuild, parallel pieces."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.index.vectors as vec
from pipeline.bench.index import clustered_vectors, write_vector_output
from pipeline.errors import PipelineError
from pipeline.index.build import inner_index
from pipeline.index.choice import choose_index, describe_factory, parse_size
from pipeline.index.files import index_dir, load_index, read_info
from pipeline.index.store import build_index, family
from pipeline.index.update import update_index


def _all_vectors(out: Path) -> np.ndarray:
    return np.concatenate([vec.read_part_vectors(p) for p in vec.complete_parts(out)])


def _ids_at(out: Path, positions: np.ndarray) -> list[list[str]]:
    info = read_info(out)
    ids = pq.read_table(index_dir(out) / info["files"]["ids"]).column("id").to_pylist()
    return [[ids[p] for p in row if p >= 0] for row in positions]


# ------------------------------------------------------------------------------------------ choice


def test_parse_size() -> None:
    assert parse_size("4G") == 4 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("100000") == 100000
    assert parse_size(2048) == 2048
    for bad in ("lots", "-1G", "0", "4X"):
        with pytest.raises(PipelineError, match="max_memory"):
            parse_size(bad)


def test_automatic_choice_follows_the_budget() -> None:
    kinds = [family(choose_index(1_000_000, 384, b, lists="memory").factory) for b in ("64G", "1G", "400M", "60M")]
    assert kinds == ["IVF-Flat", "IVF-SQ", "IVF-PQ", "IVF-PQ"]
    small = choose_index(1_000_000, 384, "60M", lists="memory")
    large = choose_index(1_000_000, 384, "400M", lists="memory")
    assert small.index_bytes < large.index_bytes <= parse_size("400M")
    assert choose_index(20_000, 384, "4G").factory == "Flat"  # exact search is fast enough
    assert choose_index(200_000, 384, "4G").factory == "HNSW32"
    assert "IVF" in choose_index(200_000, 384, "200M").factory  # the HNSW graph does not fit
    for b in ("64G", "1G", "400M", "60M"):
        c = choose_index(1_000_000, 384, b)
        assert c.build_bytes(384) <= parse_size(b) and c.reason
    with pytest.raises(PipelineError, match="raise --max-memory"):
        choose_index(1_000_000, 384, "10M")


def test_forced_factory_estimates() -> None:
    c = describe_factory("IVF64,PQ8x4", 10_000, 32)
    assert (c.tune, c.automatic) == ("nprobe", False) and c.train_size >= 39 * 64
    assert describe_factory("HNSW16", 10_000, 32).tune == "efSearch"
    assert describe_factory("Flat", 10_000, 32).index_bytes == 10_000 * 32 * 4
    with pytest.raises(PipelineError, match="faiss cannot build"):
        describe_factory("NoSuchIndex", 10, 32)


# ------------------------------------------------------------------------------------------ build


def test_build_records_info_and_id_map(tmp_path: Path) -> None:
    x = clustered_vectors(3000, 32, seed=1)
    write_vector_output(tmp_path, x, shard_size=700, dtype="float16")
    info = build_index(tmp_path, factory="HNSW16", recall_queries=200)
    for key in ("factory", "metric", "dims", "ntotal", "search_params", "recall@1", "recall@10", "recall@100",
                "size_bytes", "build_seconds", "parts"):
        assert key in info, key
    assert info["ntotal"] == 3000 and info["dims"] == 32 and info["metric"] == "ip"
    assert set(info["search_params"]) == {"efSearch"} and info["recall@10"] >= 0.95
    assert [p["name"] for p in info["parts"]] == [f"part-{i:06d}.parquet" for i in range(5)]
    on_disk = json.loads((tmp_path / "index" / "info.json").read_text())
    assert all(isinstance(on_disk[k], float) for k in on_disk if "recall" in k and k != "recall_queries")
    assert info["size_bytes"] == (tmp_path / "index" / info["files"]["index"]).stat().st_size
    ids = pq.read_table(tmp_path / "index" / info["files"]["ids"])
    assert ids.column("id").to_pylist() == [f"v{i}" for i in range(3000)]
    assert ids.column("shard").to_pylist()[700] == 1 and ids.column("row").to_pylist()[700] == 0
    index, _ = load_index(tmp_path)
    assert inner_index(index).hnsw.efSearch == info["search_params"]["efSearch"]


def test_no_vectors_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no finished vector parts"):
        build_index(tmp_path)
    with pytest.raises(PipelineError, match="has no index"):
        read_info(tmp_path)


def test_recall_of_a_forced_ivf_pq_equals_numpy_brute_force(tmp_path: Path) -> None:
    x = clustered_vectors(8000, 32, seed=2)
    write_vector_output(tmp_path, x, shard_size=3000)
    info = build_index(tmp_path, factory="IVF32,PQ8x4", recall_queries=300, target_recall=0.99)
    stored = np.load(tmp_path / "index" / info["files"]["queries"])
    pos, q = stored["report_positions"], stored["report_vectors"]  # recall is reported on this set
    assert len(pos) == 300 and not set(pos) & set(stored["tune_positions"])  # tuned on another set
    np.testing.assert_array_equal(q, x[pos])  # the queries are corpus vectors
    sims = q @ x.T  # independent exact neighbours, the query itself excluded
    sims[np.arange(len(pos)), pos] = -np.inf
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :100]
    index = faiss.read_index(str(tmp_path / "index" / info["files"]["index"]))
    faiss.extract_index_ivf(index).nprobe = info["search_params"]["nprobe"]
    for k in (1, 10, 100):
        found = index.search(q, k + 1)[1]
        found = np.array([[p for p in row if p != pos[i]][:k] for i, row in enumerate(found)])
        expected = np.mean([len(set(found[i]) & set(truth[i, :k])) / k for i in range(len(pos))])
        assert info[f"recall@{k}"] == pytest.approx(expected, abs=1e-6), k
    assert info["recall@10"] < 0.99 and not info["tuning"]["reached"]  # 4-byte codes cap recall: it says so


def test_budget_is_respected_and_changes_the_choice(tmp_path: Path) -> None:
    x = clustered_vectors(20_000, 64, seed=3)
    write_vector_output(tmp_path, x, shard_size=5000)
    big = build_index(tmp_path, max_memory="64M", recall_queries=200)
    assert big["factory"] == "Flat"
    budget = "5000K"
    expected = choose_index(20_000, 64, budget)
    assert family(expected.factory) == "IVF-SQ"
    small = build_index(tmp_path, max_memory=budget, recall_queries=200)
    assert small["factory"] == expected.factory != big["factory"]
    assert small["size_bytes"] <= parse_size(budget)
    assert small["size_bytes"] + small["trained"]["vectors"] * 64 * 4 <= parse_size(budget)
    assert small["recall@10"] > 0.8 and small["choice"]["automatic"]  # 8-bit codes may cap it below the target


def test_gpu_without_faiss_gpu_says_so_and_builds_on_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    write_vector_output(tmp_path, clustered_vectors(500, 16), shard_size=500)
    with caplog.at_level(logging.WARNING, logger="pipeline.index"):
        info = build_index(tmp_path, gpu=True, recall_queries=50)
    assert info["gpu"] is False and "faiss-gpu" in info["gpu_note"]
    assert any("faiss-gpu" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------ update


class _ReadLog:
    """Wraps the part readers of ``pipeline.vectors`` to record which parts' vectors are read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real_batches, real_read = vec.iter_batches, vec.read_part_vectors

        def iter_batches(part, *a, **kw):
            self.paths.append(part.name)
            return real_batches(part, *a, **kw)

        def read_part_vectors(part):
            self.paths.append(part.name)
            return real_read(part)

        monkeypatch.setattr(vec, "iter_batches", iter_batches)
        monkeypatch.setattr(vec, "read_part_vectors", read_part_vectors)


def test_update_reads_only_new_parts_and_equals_a_full_flat_build(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered_vectors(6000, 32, seed=4)
    grown, full = tmp_path / "grown", tmp_path / "full"
    write_vector_output(grown, x[:3000], shard_size=1000)
    first = build_index(grown, factory="Flat", recall_queries=200)
    assert first["ntotal"] == 3000
    write_vector_output(grown, x[3000:], shard_size=1000, first_shard=3, ids=[f"v{i}" for i in range(3000, 6000)])
    reads = _ReadLog(monkeypatch)
    info = update_index(grown)
    assert info["added"] == 3000 and info["ntotal"] == 6000 and len(info["parts"]) == 6
    assert reads.paths and set(reads.paths) <= {f"part-{i:06d}.parquet" for i in (3, 4, 5)}
    assert info["recall@10"] == 1.0 and not info["rebuild_due"]
    assert info["updates"][-1]["parts"] == [f"part-{i:06d}.parquet" for i in (3, 4, 5)]
    monkeypatch.undo()
    write_vector_output(full, x, shard_size=1000)
    build_index(full, factory="Flat", recall_queries=200)
    q = clustered_vectors(50, 32, seed=99)
    (a, _), (b, _) = load_index(grown), load_index(full)
    (da, ia), (db, ib) = a.search(q, 10), b.search(q, 10)
    assert _ids_at(grown, ia) == _ids_at(full, ib)
    np.testing.assert_allclose(da, db, rtol=0, atol=1e-6)
    again = update_index(grown)
    assert again["added"] == 0 and again["generation"] == info["generation"]


def test_update_says_when_a_rebuild_is_due(tmp_path: Path) -> None:
    x = clustered_vectors(4000, 32, seed=5)
    write_vector_output(tmp_path, x, shard_size=2000)
    build_index(tmp_path, factory="IVF16,Flat", recall_queries=200)
    far = clustered_vectors(2000, 32, seed=77)  # another distribution: the trained lists fit it badly
    far = -far + 0.5 * np.roll(far, 3, axis=1)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    write_vector_output(tmp_path, far.astype(np.float32), shard_size=2000, first_shard=2,
                        ids=[f"far{i}" for i in range(2000)])
    info = update_index(tmp_path)
    assert info["rebuild_due"] and any("drift" in r for r in info["rebuild_reasons"])
    # the next night adds nothing (or its rebuild was skipped): the rebuild is still due, said once
    again = update_index(tmp_path)
    assert again["rebuild_due"] and again["rebuild_reasons"] == info["rebuild_reasons"]
    write_vector_output(tmp_path, x[:100], shard_size=100, first_shard=3, ids=[f"more{i}" for i in range(100)])
    later = update_index(tmp_path)  # new vectors that fit the lists: the drift found before still stands
    assert later["rebuild_due"] and sum("drift" in r for r in later["rebuild_reasons"]) == 1
    assert not build_index(tmp_path, factory="IVF16,Flat", recall_queries=200).get("rebuild_reasons")


def test_update_without_an_index_builds_one(tmp_path: Path) -> None:
    write_vector_output(tmp_path, clustered_vectors(300, 16), shard_size=100)
    info = update_index(tmp_path, recall_queries=50)
    assert info["built"] and info["ntotal"] == 300


# ------------------------------------------------------------------------------------------ atomic rebuild


def _spawn_build(out: Path, factory: str) -> subprocess.Popen:
    code = f"from pipeline.index.store import build_index; build_index({str(out)!r}, factory={factory!r}, " \
           "recall_queries=500)"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _assert_usable(out: Path, queries: np.ndarray) -> tuple[str, list[list[str]]]:
    info = read_info(out)
    index, _ = load_index(out)
    assert index.ntotal == info["ntotal"]
    return info["generation"], _ids_at(out, index.search(queries, 5)[1])


def test_kill_9_during_a_rebuild_leaves_the_old_index_usable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    x = clustered_vectors(30_000, 32, seed=6)
    write_vector_output(out, x, shard_size=5000)
    old = build_index(out, factory="Flat", recall_queries=200)
    q = clustered_vectors(20, 32, seed=8)
    gen0, results0 = _assert_usable(out, q)
    # how long a rebuild takes, measured on a copy
    probe = tmp_path / "probe"
    shutil.copytree(out, probe, symlinks=True)
    t0 = time.monotonic()
    assert _spawn_build(probe, "IVF128,Flat").wait(timeout=300) == 0
    duration = time.monotonic() - t0
    survived = 0
    for fraction in (0.2, 0.5, 0.8, 0.95, None):
        proc = _spawn_build(out, "IVF128,Flat")
        if fraction is None:  # the riskiest moment: the new generation's files are being written
            deadline = time.monotonic() + duration * 2
            while proc.poll() is None and time.monotonic() < deadline:
                if any(p.name.startswith(".tmp-") for p in (out / "index").iterdir()):
                    break
                time.sleep(0.002)
        else:
            time.sleep(duration * fraction)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)  # kill -9 (a no-op when it has already exited)
        proc.wait()
        gen, results = _assert_usable(out, q)
        if gen == gen0:
            assert results == results0
            survived += not finished
        else:  # the build got through its commit before the kill: the new index must be complete
            assert read_info(out)["factory"] == "IVF128,Flat"
            break
    assert survived >= 1
    info = build_index(out, factory="IVF128,Flat", recall_queries=200)  # the rerun completes and cleans up
    assert info["generation"] != old["generation"]
    names = {p.name for p in (out / "index").iterdir()}
    assert names == {".lock", "info.json", *info["files"].values()}


# ------------------------------------------------------------------------------------------ parallel pieces


@pytest.mark.parametrize("factory", ["IVF64,Flat", "Flat"])
def test_pieces_built_in_parallel_and_merged_equal_one_build(tmp_path: Path, factory: str) -> None:
    x = clustered_vectors(12_000, 32, seed=9)
    one, many = tmp_path / "one", tmp_path / "many"
    write_vector_output(one, x, shard_size=1500)
    write_vector_output(many, x, shard_size=1500)
    a = build_index(one, factory=factory, workers=1, recall_queries=200)
    b = build_index(many, factory=factory, workers=3, recall_queries=200)
    assert a["ntotal"] == b["ntotal"] == 12_000 and b["workers"] == 3
    assert a["search_params"] == b["search_params"] and a["recall@10"] == b["recall@10"]
    (ia, _), (ib, _) = load_index(one), load_index(many)
    q = clustered_vectors(100, 32, seed=10)
    (da, pa_), (db, pb) = ia.search(q, 20), ib.search(q, 20)
    np.testing.assert_array_equal(pa_, pb)
    np.testing.assert_array_equal(da, db)
    assert pq.read_table(index_dir(one) / a["files"]["ids"]).equals(pq.read_table(index_dir(many) / b["files"]["ids"]))


def test_ids_map_back_to_parts(tmp_path: Path) -> None:
    x = clustered_vectors(900, 16, seed=11)
    write_vector_output(tmp_path, x, shard_size=400)
    info = build_index(tmp_path, factory="Flat", recall_queries=50)
    index, _ = load_index(tmp_path)
    _, found = index.search(x[[5, 450, 899]], 1)
    table = pq.read_table(index_dir(tmp_path) / info["files"]["ids"]).take(pa.array(found[:, 0]))
    assert table.column("id").to_pylist() == ["v5", "v450", "v899"]
    assert table.column("shard").to_pylist() == [0, 1, 2]
    assert table.column("row").to_pylist() == [5, 50, 99]


# ------------------------------------------------------------------------------------------ recall: what it measures


def test_recall_is_tuned_on_one_query_set_and_reported_on_another(tmp_path: Path) -> None:
    x = clustered_vectors(8000, 32, seed=12)
    write_vector_output(tmp_path, x, shard_size=2000)
    info = build_index(tmp_path, factory="IVF64,SQ8", recall_queries=300, target_recall=0.9)
    stored = np.load(tmp_path / "index" / info["files"]["queries"])
    tune, report = stored["tune_positions"], stored["report_positions"]
    assert len(tune) == len(report) == 300 and not set(tune) & set(report)
    assert info["recall_queries"]["tune"] == info["recall_queries"]["report"] == 300
    assert "two disjoint sets" in info["recall_queries"]["kind"]
    index = faiss.read_index(str(tmp_path / "index" / info["files"]["index"]))
    nprobe = info["search_params"]["nprobe"]
    faiss.extract_index_ivf(index).nprobe = nprobe

    def recall10(pos: np.ndarray) -> float:
        q = x[pos]
        sims = q @ x.T
        sims[np.arange(len(pos)), pos] = -np.inf
        truth = np.argsort(-sims, axis=1, kind="stable")[:, :10]
        found = [[p for p in row if p != pos[i]][:10] for i, row in enumerate(index.search(q, 11)[1])]
        return float(np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(len(pos))]))

    chosen = next(c for c in info["tuning"]["curve"] if c["nprobe"] == nprobe)
    assert chosen["recall@10"] == pytest.approx(recall10(tune), abs=1e-6)  # the curve: the tune set
    assert info["recall@10"] == pytest.approx(recall10(report), abs=1e-6)  # the reported figure: the other set


def test_leaving_the_querys_own_entry_out_of_an_ivf_scan_equals_its_absence(tmp_path: Path) -> None:
    """Why IVF and flat indexes keep their queries: the results without the query's own entry are exactly those
    of the index without the query (checked one query at a time on a copy that lost it)."""
    x = clustered_vectors(4000, 16, seed=13)
    write_vector_output(tmp_path, x, shard_size=1000)
    info = build_index(tmp_path, factory="IVF32,SQ8", recall_queries=100)
    full, _ = load_index(tmp_path)
    report = np.load(tmp_path / "index" / info["files"]["queries"])["report_positions"][:15]
    for pos in report:
        kept = [p for p in full.search(x[pos:pos + 1], 11)[1][0] if p != pos][:10]
        without = faiss.clone_index(full)
        without.remove_ids(np.array([pos], dtype=np.int64))
        assert kept == list(without.search(x[pos:pos + 1], 10)[1][0])


def test_hnsw_queries_are_held_out_of_the_graph_while_measured(tmp_path: Path, monkeypatch) -> None:
    import pipeline.index.store as store

    x = clustered_vectors(3000, 16, seed=14)
    write_vector_output(tmp_path, x, shard_size=1000)
    seen = {}
    real = store.recall_block

    def spy(index, parts, starts, tune, report, *args, **kwargs):
        ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
        seen["ntotal"] = index.ntotal
        seen["queries_in_graph"] = int(np.isin(np.concatenate([tune.positions, report.positions]), ids).sum())
        return real(index, parts, starts, tune, report, *args, **kwargs)

    monkeypatch.setattr(store, "recall_block", spy)
    info = build_index(tmp_path, factory="HNSW16", recall_queries=200)
    assert seen == {"ntotal": 3000 - 400, "queries_in_graph": 0}
    assert info["ntotal"] == 3000 and "held out of the graph" in info["recall_queries"]["kind"]
    index, _ = load_index(tmp_path)
    stored = np.load(tmp_path / "index" / info["files"]["queries"])
    pos = stored["report_positions"][:20]
    np.testing.assert_array_equal(index.search(x[pos], 1)[1][:, 0], pos)  # added after: found at their position


def test_recall_k_tunes_for_the_deepest_k_asked(tmp_path: Path) -> None:
    x = clustered_vectors(8000, 32, seed=15)
    write_vector_output(tmp_path, x, shard_size=2000)
    at10 = build_index(tmp_path, factory="IVF64,Flat", recall_queries=300, target_recall=0.95)
    at100 = build_index(tmp_path, factory="IVF64,Flat", recall_queries=300, target_recall=0.95, recall_k=100)
    assert at10["tuning"]["k"] == 10 and at100["tuning"]["k"] == 100
    assert at100["search_params"]["nprobe"] > at10["search_params"]["nprobe"]
    chosen = next(c for c in at100["tuning"]["curve"] if c["nprobe"] == at100["search_params"]["nprobe"])
    assert chosen["recall@100"] >= 0.95 > at10["recall@100"]  # @10 tuning leaves @100 below the target
    with pytest.raises(PipelineError, match="recall_k"):
        build_index(tmp_path, factory="Flat", recall_k=50)


def test_a_rebuild_keeps_the_metric_and_recall_target_unless_told(tmp_path: Path) -> None:
    """`index update` advises `embed-corpus index build OUT` when a rebuild is due; done as advised, it rebuilt an
    l2 index as inner product (the flag's default), which ranks unnormalised vectors otherwise, exit 0."""
    from helpers import run_ok

    write_vector_output(tmp_path, clustered_vectors(600, 16, seed=3), shard_size=200)
    run_ok("index", "build", str(tmp_path), "--factory", "Flat", "--metric", "l2", "--target-recall", "0.9",
           "--recall-k", "100", "--query-side-queries", "0")
    run_ok("index", "build", str(tmp_path), "--query-side-queries", "0")
    info = read_info(tmp_path)
    assert (info["metric"], info["tuning"]["target"], info["tuning"]["k"]) == ("l2", 0.9, 100)
    run_ok("index", "build", str(tmp_path), "--metric", "ip", "--query-side-queries", "0")
    assert read_info(tmp_path)["metric"] == "ip"
