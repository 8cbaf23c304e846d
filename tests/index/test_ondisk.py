"""The index past one process's memory: on-disk inverted lists, builds in pieces (separate processes, killed and
rerun alone), bounded training and sampling, and what the user is told."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, subprocess_env

import pipeline.index.build as build_mod
import pipeline.index.store as store
import pipeline.index.vectors as vec
from pipeline.bench.index import clustered_vectors, write_vector_output
from pipeline.errors import PipelineError
from pipeline.index import pieces as pc
from pipeline.index.choice import choose_index, describe_factory, format_size, parse_size
from pipeline.index.files import index_dir, load_index
from pipeline.index.store import build_index


def _search(out: Path, q: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    index, info = load_index(out)
    return index.search(q, k)


# ------------------------------------------------------------------------------------------ the choice


def test_codes_that_do_not_fit_memory_go_on_disk_and_the_reason_says_so() -> None:
    c = choose_index(10_000_000, 128, "1G")
    assert c.on_disk and c.factory == "IVF8192,SQfp16"
    assert "on disk" in c.reason and "memory-mapped" in c.reason
    assert c.build_bytes(128) <= parse_size("1G") < c.index_bytes  # the index is larger than the budget
    assert c.resident_bytes < 16 * 2**20  # search memory: the coarse quantizer
    # without the on-disk rungs the codes shrink to fit memory instead
    mem = choose_index(10_000_000, 128, "1G", lists="memory")
    assert not mem.on_disk and "PQ" in mem.factory and mem.build_bytes(128) <= parse_size("1G")
    # a disk too small for half-precision codes (twice, while merging) gets 8-bit ones, then PQ in memory
    assert choose_index(10_000_000, 128, "1G", disk_free=4 * 2**30).factory == "IVF8192,SQ8"
    assert not choose_index(10_000_000, 128, "1G", disk_free=2**30).on_disk
    # --lists disk: the most exact codes the disk holds
    assert choose_index(10_000_000, 128, "1G", lists="disk").factory == "IVF8192,Flat"
    # a factory the user gave keeps its codes; its lists go on disk when they do not fit the budget
    forced = describe_factory("IVF64,SQ8", 10_000_000, 128, max_memory="1G")
    assert forced.on_disk and "do not fit --max-memory" in forced.reason and not forced.automatic
    assert not describe_factory("IVF64,SQ8", 10_000, 128, max_memory="1G").on_disk
    with pytest.raises(PipelineError, match="no inverted lists"):
        describe_factory("HNSW16", 1000, 32, lists="disk")


# ------------------------------------------------------------------------------------------ pieces and lists


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("ondisk")
    x = clustered_vectors(6000, 32, seed=21)
    write_vector_output(root / "src", x, shard_size=700)
    return root, x


def _copy(corpus: tuple[Path, np.ndarray], name: str) -> Path:
    root, _ = corpus
    dst = root / name
    shutil.copytree(root / "src", dst)
    return dst


def test_on_disk_build_in_pieces_equals_a_build_in_memory(corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three pieces, each written in several runs of bounded size, merged into a lists file that is memory-mapped
    read-only: the same results, the same recall, as the whole index built in memory by one process."""
    _, x = corpus
    mem, disk = _copy(corpus, "mem"), _copy(corpus, "disk")
    a = build_index(mem, factory="IVF32,SQfp16", lists="memory", recall_queries=200)
    monkeypatch.setattr(store, "MIN_RUN_ROWS", 500)  # runs of at most ~500 vectors in a budget of 2 MB
    b = build_index(disk, factory="IVF32,SQfp16", lists="disk", pieces=3, max_memory="2M", recall_queries=200)
    assert not a["on_disk"] and b["on_disk"] and "lists" in b["files"] and "lists" not in a["files"]
    runs = [len(p["runs"]) for p in b["steps"]["pieces"]]
    assert len(runs) == 3 and all(r >= 3 for r in runs), runs  # each piece wrote several bounded runs
    assert sum(p["rows"] for p in b["steps"]["pieces"]) == 6000
    assert a["search_params"] == b["search_params"]
    for k in (1, 10, 100):
        assert a[f"recall@{k}"] == b[f"recall@{k}"]
    q = clustered_vectors(50, 32, seed=99)
    (da, ia), (db, ib) = _search(mem, q), _search(disk, q)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(da, db)
    index, _ = load_index(disk)
    lists = build_mod.on_disk_lists(index)
    assert lists is not None and lists.read_only  # searches map the lists file read-only
    folder = index_dir(disk)
    assert (folder / b["files"]["lists"]).stat().st_size >= 6000 * (64 + 8)
    assert {p.name for p in folder.iterdir()} == {".lock", "info.json", *b["files"].values()}  # no build-* left
    assert b["size_bytes"] == sum((folder / b["files"][k]).stat().st_size for k in ("index", "lists"))


def test_pieces_in_separate_processes_equal_one_process(corpus) -> None:
    one, many = _copy(corpus, "one"), _copy(corpus, "many")
    a = build_index(one, factory="IVF32,SQ8", lists="disk", pieces=1, recall_queries=200)
    b = build_index(many, factory="IVF32,SQ8", lists="disk", pieces=2, workers=2, recall_queries=200)
    pids = {p["host"] + str(p["peak_rss_bytes"]) for p in b["steps"]["pieces"]}
    assert b["pieces"] == 2 and len(pids) >= 1
    q = clustered_vectors(50, 32, seed=98)
    (da, ia), (db, ib) = _search(one, q), _search(many, q)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(da, db)
    ids_a = pq.read_table(index_dir(one) / a["files"]["ids"])
    assert ids_a.equals(pq.read_table(index_dir(many) / b["files"]["ids"]))


def test_pieces_built_one_by_one_then_merged_rerun_alone(corpus) -> None:
    """The Slurm shape: `--piece K` per task (the first trains), `--merge` at the end. A missing piece stops the
    merge with its number; building it alone completes the build, the others untouched."""
    out, ref = _copy(corpus, "slurmlike"), _copy(corpus, "slurmref")
    opts = dict(factory="IVF32,SQfp16", lists="disk", pieces=3, recall_queries=200)
    r0 = build_index(out, piece=0, **opts)
    r2 = build_index(out, piece=2, **opts)
    assert r0["piece"] == 0 and r2["piece"] == 2 and r0["rows"] + r2["rows"] < 6000
    folder = next(p for p in index_dir(out).iterdir() if p.name.startswith("build-"))
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("piece-[02]*")}
    with pytest.raises(PipelineError, match=r"1 of 3 pieces are not built \(1\)"):
        build_index(out, merge=True, **opts)
    assert not (index_dir(out) / "info.json").exists()
    build_index(out, piece=1, **opts)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("piece-[02]*")} == before  # not rebuilt
    info = build_index(out, merge=True, **opts)
    assert info["live"] == 6000 and not folder.exists()
    whole = build_index(ref, factory="IVF32,SQfp16", lists="disk", recall_queries=200)
    q = clustered_vectors(50, 32, seed=97)
    np.testing.assert_array_equal(_search(out, q)[1], _search(ref, q)[1])
    assert info["recall@10"] == whole["recall@10"]
    with pytest.raises(PipelineError, match="no build in 3 pieces"):
        build_index(out, merge=True, **opts)  # merged and removed: nothing left to merge


def test_a_killed_build_in_pieces_reruns_only_the_missing_pieces(tmp_path: Path, monkeypatch) -> None:
    """kill -9 in the middle of a local build in pieces: the rerun builds only the pieces without a record (the
    finished ones are reused, their runs untouched) and gives the index of an uninterrupted build."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    x = clustered_vectors(96_000, 32, seed=22)
    write_vector_output(out, x, shard_size=6000)
    code = (f"from pipeline.index.store import build_index; build_index({str(out)!r}, factory='IVF256,Flat', "
            "pieces=8, recall_queries=200)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(index_dir(out).glob("build-*/piece-0.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before its first piece"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it at once, then kill -9
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = next(index_dir(out).glob("build-*"))
    done = {int(p.name[6:-5]) for p in folder.glob("piece-*.json")}
    assert 0 in done and len(done) < 8 and not (index_dir(out) / "info.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("piece-*")
                if int(p.name.split("-")[1].split(".")[0]) in done}
    built = []
    real = pc.run_piece

    def spy(plan, parts, k, **kw):
        built.append(k)
        if k == max(set(range(8)) - done):  # the finished pieces' files are still those of the killed run
            assert {n: (folder / n).stat().st_mtime_ns for n in finished} == finished
        return real(plan, parts, k, **kw)

    monkeypatch.setattr(pc, "run_piece", spy)
    info = build_index(out, factory="IVF256,Flat", pieces=8, recall_queries=200)
    assert sorted(built) == sorted(set(range(8)) - done)
    assert info["live"] == 96_000 and not folder.exists()
    write_vector_output(ref, x, shard_size=6000)
    whole = build_index(ref, factory="IVF256,Flat", recall_queries=200)
    q = clustered_vectors(40, 32, seed=96)
    np.testing.assert_array_equal(_search(out, q)[1], _search(ref, q)[1])
    assert info["recall@10"] == whole["recall@10"]


# ------------------------------------------------------------------------------------------ the files


def test_an_on_disk_index_works_after_the_output_moves_and_json_stays_clean(tmp_path: Path) -> None:
    """faiss prints to stdout when it merges lists and when it finds a moved lists file: `--json` must stay
    parseable, and the index must open beside its new place."""
    out = tmp_path / "out"
    x = clustered_vectors(3000, 16, seed=24)
    write_vector_output(out, x[:2000], shard_size=500)
    cli = [sys.executable, "-m", "pipeline.cli", "index"]
    built = subprocess.run([*cli, "build", str(out), "--factory", "IVF16,SQ8", "--lists", "disk", "--json"],
                           env=subprocess_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert built.returncode == 0, built.stderr
    info = json.loads(built.stdout)
    assert info["on_disk"]
    moved = tmp_path / "elsewhere" / "out"
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    write_vector_output(moved, x[2000:], shard_size=500, first_shard=4, ids=[f"w{i}" for i in range(1000)])
    updated = subprocess.run([*cli, "update", str(moved), "--json"], env=subprocess_env(), capture_output=True,
                             text=True, cwd=tmp_path, timeout=300)
    assert updated.returncode == 0, updated.stderr
    info = json.loads(updated.stdout)
    assert info["added"] == 1000 and info["live"] == 3000 and info["on_disk"]
    index, _ = load_index(moved)
    assert index.ntotal == 3000
    found = index.search(x[2500:2510], 1)[1][:, 0]
    np.testing.assert_array_equal(found, np.arange(2500, 2510))


# ------------------------------------------------------------------------------------------ training and sampling


def test_two_level_kmeans_is_used_for_many_lists_and_fits_as_well(tmp_path: Path, monkeypatch) -> None:
    x = clustered_vectors(20_000, 16, seed=25)
    flat = faiss.index_factory(16, "IVF256,Flat", faiss.METRIC_INNER_PRODUCT)
    assert build_mod.train(flat, x, None) == {"kmeans": "flat"}
    monkeypatch.setattr(build_mod, "TWO_LEVEL_MIN_LISTS", 256)
    two = faiss.index_factory(16, "IVF256,Flat", faiss.METRIC_INNER_PRODUCT)
    assert build_mod.train(two, x, None) == {"kmeans": "two-level"}
    assert two.is_trained and faiss.extract_index_ivf(two).quantizer.ntotal == 256
    e_flat, e_two = build_mod.assignment_error(flat, x), build_mod.assignment_error(two, x)
    assert e_two < 1.15 * e_flat, (e_flat, e_two)
    # the training of a PQ index still trains its codes once the quantizer is set
    pq_index = faiss.index_factory(16, "IVF256,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    build_mod.train(pq_index, x, None)
    assert pq_index.is_trained


def test_the_sample_is_read_from_a_bounded_number_of_parts(tmp_path: Path, monkeypatch) -> None:
    write_vector_output(tmp_path, clustered_vectors(20_000, 8, seed=26), shard_size=100)
    parts = vec.complete_parts(tmp_path)
    rows, used = vec.sample_rows(parts, 50, np.random.default_rng(0))
    assert len(rows) == len(set(rows.tolist())) == 50 and used == 64  # 8 x 50 rows need 4 parts; 64 at least
    read = []
    real = vec.iter_batches
    monkeypatch.setattr(vec, "iter_batches", lambda part, *a, **k: (read.append(part.name), real(part, *a, **k))[1])
    got = vec.read_rows(parts, rows)
    assert len(set(read)) <= 64 < len(parts)
    x = np.concatenate([vec.read_part_vectors(p) for p in parts])
    np.testing.assert_array_equal(got, x[rows])
    small, used = vec.sample_rows(parts[:10], 50, np.random.default_rng(0))
    assert used == 10 and small.max() < 1000


# ------------------------------------------------------------------------------------------ what the user is told


def test_a_forced_pq_factory_on_few_vectors_is_told_once_in_its_own_words(tmp_path: Path) -> None:
    """Issue 14 item 8: faiss printed its clustering warning 16 times and advised a larger --max-memory."""
    write_vector_output(tmp_path, clustered_vectors(5000, 64, seed=27), shard_size=1000)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "index", "build", str(tmp_path), "--factory",
                           "IVF64,PQ16"], env=subprocess_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "WARNING clustering" not in said  # faiss's own, once per sub-quantizer
    assert said.count("faiss advises at least") == 1
    assert "--factory IVF64,PQ16: 5,000 vectors" in said and "PQ16x4" in said
    assert "--max-memory" not in said  # the user chose the factory: the budget is not what limits it


def test_budget_sizes_are_reported_in_user_units() -> None:
    assert format_size(parse_size("1G")) == "1.0 GiB"


def test_more_pieces_than_parts_leaves_some_pieces_empty(tmp_path: Path) -> None:
    """A Slurm array of N piece tasks must all succeed, even when the output has fewer parts than N."""
    x = clustered_vectors(1200, 16, seed=28)
    write_vector_output(tmp_path, x, shard_size=600)
    opts = dict(factory="IVF8,Flat", pieces=4, recall_queries=50)
    rows = [build_index(tmp_path, piece=k, **opts)["rows"] for k in range(4)]
    assert sorted(rows) == [0, 0, 600, 600]
    info = build_index(tmp_path, merge=True, **opts)
    assert info["live"] == 1200 and info["pieces"] == 4
    assert pc.split_parts([5, 5, 5], 2) == [(0, 2), (2, 3)] and pc.split_parts([], 2) == [(0, 0), (0, 0)]


def test_search_parameters_travel_with_each_call(tmp_path: Path) -> None:
    """``params.search`` searches at the values it is given, with or without a filter (the benchmark's speed
    against recall sweep and the tuning rely on it), not at whatever the index was last set to."""
    from pipeline.index.params import Filter, search, set_search_params

    x = clustered_vectors(4000, 16, seed=29)
    write_vector_output(tmp_path, x, shard_size=1000)
    build_index(tmp_path, factory="IVF64,Flat", recall_queries=100)
    index, _ = load_index(tmp_path)
    q = clustered_vectors(50, 16, seed=30)
    for nprobe in (1, 8, 64):
        set_search_params(index, {"nprobe": 64 if nprobe != 64 else 1})  # the index is set to something else
        got = search(index, q, 10, {"nprobe": nprobe})[1]
        set_search_params(index, {"nprobe": nprobe})
        np.testing.assert_array_equal(got, index.search(q, 10)[1])
        filt = Filter([(0, 1000)], 4000)
        got = search(index, q, 10, {"nprobe": nprobe}, filt)[1]
        assert not ((got >= 0) & (got < 1000)).any()
