"""Resume: a real ``embed-corpus`` process killed with -9 (or stopped with SIGTERM) and rerun leaves every id
exactly once with the vectors of an uninterrupted run; the manifest refuses reruns that would mix settings or
changed inputs, and embeds new input files incrementally; ``embed-corpus status`` reports progress."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (
    ModelGuard,
    assert_ids_once,
    assert_same_vectors,
    done_markers,
    embed_args,
    embeddings,
    invoke,
    make_docs,
    part_mtimes,
    read_vectors,
    run_ok,
    subprocess_env,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: see conftest


N_JSONL, N_PARQUET, SHARD = 1200, 800, 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """2,000 short documents: a JSONL file and a Parquet file of 50-row row groups (40 shards of 50)."""
    root = tmp_path_factory.mktemp("resume_corpus") / "corpus"
    docs = make_docs(N_JSONL + N_PARQUET, seed=11, min_words=1, max_words=4)
    write_jsonl(root / "part1.jsonl", docs[:N_JSONL])
    write_parquet(root / "part2.parquet", docs[N_JSONL:], row_groups=[50] * (N_PARQUET // 50))
    return root, [d["id"] for d in docs]


def job_args(corpus_dir: Path, out: Path) -> list[str]:
    return embed_args([corpus_dir], out, "--shard-size", str(SHARD))


@pytest.fixture(scope="module")
def reference(corpus, minilm_dir, tmp_path_factory):
    """The vectors of an uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("resume_reference") / "out"
    run_ok(*job_args(corpus[0], out))
    table = read_vectors(out)
    assert table.num_rows == len(corpus[1])
    return table


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m pipeline.cli ARGS`` as a real child process, output to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=subprocess_env(), cwd=log.parent)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the moment to stop it:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the moment to stop the run:\n{log.read_text()}")
        time.sleep(0.005)


def pool_parts(out: Path) -> list[Path]:
    return sorted(p for p in (out / "parts").glob("part-*.parquet") if not p.name.endswith(".docs.parquet"))


def n_shards(out: Path) -> int:
    return len(json.loads((out / "manifest.json").read_text())["shards"])


def check_output_consistent(out: Path) -> None:
    """After any kill: every part file is complete, every done-marker that counts has its part, and readers see
    no version, or a whole one."""
    for part in pool_parts(out):
        pq.read_metadata(part)  # a torn file has no footer
    for marker in done_markers(out):
        assert (out / "parts" / json.loads(marker.read_text())["part"]).exists(), marker
    assert not (out / "vectors").exists() or read_vectors(out).num_rows == N_JSONL + N_PARQUET


def test_killed_with_sigkill_at_several_moments_then_rerun(tmp_path, corpus, reference):
    corpus_dir, ids = corpus
    out = tmp_path / "out"
    args = job_args(corpus_dir, out)
    log = tmp_path / "run.log"
    moments: list[tuple[str, Callable[[], bool]]] = [
        ("right after start", lambda: out.exists()),
        ("once planned, while loading the model", lambda: (out / "manifest.json").exists()),
        ("after 3 shards", lambda: len(done_markers(out)) >= 3),
    ]
    for what, ready in moments + [("5 shards later", None)]:
        if ready is None:
            base = len(done_markers(out))
            ready = lambda base=base: len(done_markers(out)) >= base + 5  # noqa: E731
        proc = start(args, log)
        wait_until(proc, ready, log)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        done = len(done_markers(out))
        total = n_shards(out) if (out / "manifest.json").exists() else 0
        print(f"killed {what}: {done} of {total} shards done")
        assert not (out / "vectors").exists(), f"killed {what}, but the run had already finished"
        check_output_consistent(out)
    assert len(done_markers(out)) >= 8

    # the same command again finishes the job
    before = {p.name: p.stat().st_mtime_ns for p in pool_parts(out)}
    run_ok(*args)
    table = read_vectors(out)
    assert table.num_rows == len(ids)
    assert_ids_once(table, ids)
    assert_same_vectors(table, reference)
    assert len(done_markers(out)) == n_shards(out)
    finished = sorted(f"part-{m.name.split('.')[0]}.parquet" for m in done_markers(out))
    assert sorted(part_mtimes(out)) == finished
    # shards finished before the kills were not redone
    after = part_mtimes(out)
    kept = {name for name, mtime in before.items() if after.get(name) == mtime}
    assert len(kept) >= 8


def test_sigterm_stops_cleanly_then_rerun_and_status(tmp_path, minilm_dir):
    docs = make_docs(800, seed=14, min_words=1, max_words=4)
    write_jsonl(tmp_path / "corpus" / "c.jsonl", docs)
    ids = [d["id"] for d in docs]
    out = tmp_path / "out"
    args = job_args(tmp_path / "corpus", out)
    log = tmp_path / "run.log"
    started = time.time()
    proc = start(args, log)
    wait_until(proc, lambda: len(done_markers(out)) >= 2, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, log.read_text()
    wall = time.time() - started
    assert "rerun" in log.read_text()
    check_output_consistent(out)
    done, total = len(done_markers(out)), n_shards(out)
    assert 2 <= done < total
    # it finished the shard it was on and wrote nothing half-way
    assert len(pool_parts(out)) == done
    markers = [json.loads(m.read_text()) for m in done_markers(out)]
    written, tokens = sum(m["rows"] for m in markers), sum(m["tokens"] for m in markers)
    starts, ends = [m["finished_at"] - m["seconds"] for m in markers], [m["finished_at"] for m in markers]

    # status between the two runs: the markers' numbers, and a rate and ETA made from them
    result = run_ok("status", out)
    assert f"{done} done, {total - done} pending, 0 failed (of {total})" in result.output
    assert "live       none yet" in result.output
    st = json.loads(run_ok("status", out, "--json").output)
    planned = sum(s["docs"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    assert (st["shards_done"], st["shards_pending"], st["shards_failed"]) == (done, total - done, 0)
    assert (st["docs_done"], st["docs_total"], st["tokens_done"]) == (written, planned, tokens)
    span = max(ends) - min(starts)
    assert st["docs_per_s"] == pytest.approx(written / span, rel=1e-6)
    assert st["eta_seconds"] == pytest.approx((planned - written) / (written / span), rel=1e-6)
    assert 0 < span <= wall
    assert st["docs_per_s"] >= written / wall  # no faster than the run's own clock allows
    assert st["tokens_per_s"] == pytest.approx(tokens / span, rel=1e-6)
    assert f"{st['docs_per_s']:,.1f} docs/s" in result.output

    run_ok(*args)
    table = read_vectors(out)
    assert table.num_rows == len(ids)
    assert_ids_once(table, ids)

    st = json.loads(run_ok("status", out, "--json").output)
    assert (st["shards_done"], st["shards_pending"], st["docs_done"], st["docs_total"]) == (
        n_shards(out), 0, planned, planned)
    assert st["eta_seconds"] == 0 and st["version"] == 1 and st["version_docs"] == len(ids)
    assert "0 pending" in run_ok("status", out).output


# ---------------------------------------------------------------------------------------- manifest checks


@pytest.fixture
def small_job(tmp_path, minilm_dir):
    """A finished job over 80 documents in two files (4 shards of 20)."""
    corpus = tmp_path / "corpus"
    docs = make_docs(80, seed=12, max_words=6)
    write_jsonl(corpus / "a.jsonl", docs[:40])
    write_parquet(corpus / "b.parquet", docs[40:], row_groups=[20, 20])
    out = tmp_path / "out"
    args = embed_args([corpus], out, "--shard-size", "20")
    run_ok(*args)
    assert len(done_markers(out)) == 4
    return corpus, out, args, [d["id"] for d in docs]


@pytest.mark.parametrize(
    "change",
    [
        ["--dims", "128"],
        ["--model", "MINILM_DIR"],  # the same weights under another name: still another model for the manifest
        ["--text-field", "{title} {text}"],
        ["--max-length", "64"],
        ["--dtype", "float16"],
        ["--long-docs", "chunk"],
        ["--no-normalize"],
    ],
)
def test_rerun_with_other_settings_is_refused(small_job, minilm_dir, monkeypatch, change):
    corpus, out, args, _ = small_job
    change = [str(minilm_dir) if c == "MINILM_DIR" else c for c in change]
    parts, manifest = part_mtimes(out), (out / "manifest.json").read_bytes()
    guard = ModelGuard(monkeypatch)
    result = invoke(*args, *change)
    assert guard.calls == 0
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    flag = change[0].removeprefix("--no-").removeprefix("--").replace("-", "_")
    for needle in (flag, "--overwrite", "new --output"):
        assert needle in result.output, result.output
    assert part_mtimes(out) == parts and (out / "manifest.json").read_bytes() == manifest


def test_settings_that_do_not_change_vectors_are_accepted(small_job, monkeypatch):
    corpus, out, args, ids = small_job
    parts = part_mtimes(out)
    guard = ModelGuard(monkeypatch)  # nothing is pending, so the model is not even loaded
    run_ok(*args, "--batch-tokens", "999", "--sort-window", "7", "--no-quiet")
    assert guard.calls == 0
    assert part_mtimes(out) == parts
    assert_ids_once(read_vectors(out), ids)


def test_overwrite_starts_over(small_job):
    corpus, out, args, ids = small_job
    (out / "vectors" / "part-999999.parquet").write_bytes(b"stale")
    run_ok(*args, "--dims", "128", "--overwrite")
    table = read_vectors(out)
    assert_ids_once(table, ids)
    assert embeddings(table).shape == (len(ids), 128)
    assert json.loads((out / "job.json").read_text())["model"]["dims"] == 128


@pytest.mark.parametrize("edit", ["append", "same_size", "parquet"])
def test_changed_input_file_is_followed(small_job, tmp_path, edit):
    """A file changed in place (appended, a same-size edit in the middle, rewritten) is scanned again: the output
    holds exactly its current rows, as a run from scratch would."""
    corpus, out, args, _ = small_job
    if edit == "append":
        with open(corpus / "a.jsonl", "a") as f:
            f.write(json.dumps({"id": "new", "text": "one more"}) + "\n")
    elif edit == "same_size":  # one id changed, same length
        data = (corpus / "a.jsonl").read_bytes()
        pos = data.index(b'"doc20"')
        (corpus / "a.jsonl").write_bytes(data[:pos] + b'"dxc20"' + data[pos + 7:])
    else:
        write_parquet(corpus / "b.parquet", make_docs(40, seed=99, start=40), row_groups=[20, 20])
    run_ok(*args)
    scratch = tmp_path / "scratch"
    run_ok(*embed_args([corpus], scratch, "--shard-size", "20"))
    table, expected = read_vectors(out), read_vectors(scratch)
    assert_ids_once(table, expected.column("id").to_pylist())
    assert_same_vectors(table, expected)


def test_a_same_size_edit_in_the_middle_of_a_large_file_is_followed(tmp_path, minilm_dir):
    """A file over 2 MiB whose first and last MiB and size stay the same while an id in its middle changes (the
    change an earlier head-and-tail hash missed, issue 13 item 2): the rerun follows the whole content."""
    pad = "x" * (1 << 20)
    docs = make_docs(30, seed=21)
    rows = [{**d, "pad": pad if i in (0, 29) else ""} for i, d in enumerate(docs)]
    path = write_jsonl(tmp_path / "corpus" / "big.jsonl", rows)
    assert path.stat().st_size > (2 << 20) + 1000
    out = tmp_path / "out"
    args = embed_args([path.parent], out, "--shard-size", "10")
    run_ok(*args)
    data = path.read_bytes()
    pos = data.index(b'"doc15"')
    assert (1 << 20) < pos < len(data) - (1 << 20)
    path.write_bytes(data[:pos] + b'"dxc15"' + data[pos + 7:])
    run_ok(*args)
    scratch = tmp_path / "scratch"
    run_ok(*embed_args([path.parent], scratch, "--shard-size", "10"))
    table, expected = read_vectors(out), read_vectors(scratch)
    assert "dxc15" in table.column("id").to_pylist() and "doc15" not in table.column("id").to_pylist()
    assert_ids_once(table, expected.column("id").to_pylist())
    assert_same_vectors(table, expected)


def test_a_refused_rerun_names_the_effective_settings(small_job, monkeypatch):
    """``max_length`` left to the model is shown as the model's limit (256 for MiniLM), not ``None``."""
    _corpus, _out, args, _ = small_job
    guard = ModelGuard(monkeypatch)
    result = invoke(*args, "--max-length", "128")
    assert guard.calls == 0 and result.exit_code == 1
    assert "max_length: 256 -> 128" in result.output, result.output


def test_new_input_file_is_embedded_incrementally(small_job):
    corpus, out, args, ids = small_job
    parts = part_mtimes(out)
    time.sleep(0.01)  # mtimes of rewritten files would differ
    new_docs = make_docs(50, seed=13, start=80)
    write_jsonl(corpus / "nightly" / "c.jsonl.gz", new_docs)
    run_ok(*args)
    table = read_vectors(out)
    assert_ids_once(table, ids + [d["id"] for d in new_docs])
    after = part_mtimes(out)
    assert {k: after[k] for k in parts} == parts, "old part files were rewritten"
    assert len(after) == len(parts) + 3  # 50 new rows in shards of 20
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["added"], counts["unchanged"], counts["changed"], counts["deleted"]) == (50, 80, 0, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(f["path"]).name for f in manifest["files"]] == ["a.jsonl", "b.parquet", "c.jsonl.gz"]
    # a file that is gone leaves the output with its documents
    (corpus / "a.jsonl").unlink()
    run_ok(*args)
    assert_ids_once(read_vectors(out), ids[40:] + [d["id"] for d in new_docs])


def test_status_of_a_directory_that_is_no_output(tmp_path):
    result = invoke("status", tmp_path)
    assert result.exit_code == 1 and "manifest" in result.output
    assert invoke("status", tmp_path / "missing").exit_code == 2


def test_status_reports_failed_shards(small_job, monkeypatch):
    from pipeline.errors import EncodeError
    from pipeline.model.encoder import Embedder

    corpus, out, args, ids = small_job
    new_docs = make_docs(40, seed=31, start=300)
    write_jsonl(corpus / "c.jsonl", new_docs)
    real = Embedder.embed_encoded
    calls = []

    def flaky(self, enc, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second shard (the first call embeds the check texts)
            raise EncodeError("non-finite vectors (NaN/inf), the first for sequence 0", index=0)
        return real(self, enc, **kwargs)

    monkeypatch.setattr(Embedder, "embed_encoded", flaky)
    result = invoke(*args)
    assert result.exit_code == 1 and "non-finite" in result.output
    monkeypatch.undo()
    st = json.loads(run_ok("status", out, "--json").output)
    assert (st["shards_done"], st["shards_failed"], st["shards_pending"]) == (1, 1, 1)
    assert st["version"] == 1 and st["plan_target"] == 2
    assert "non-finite" in run_ok("status", out).output
    # the rerun redoes the failed shard and clears its failure
    run_ok(*args)
    st = json.loads(run_ok("status", out, "--json").output)
    assert (st["shards_done"], st["shards_failed"], st["shards_pending"]) == (2, 0, 0)
    assert_ids_once(read_vectors(out), ids + [d["id"] for d in new_docs])


def test_new_shard_size_applies_to_newly_planned_files_only(small_job):
    """The shard size shapes the plan, not the vectors: a rerun with another one keeps the parts written and cuts
    only the new work with it."""
    corpus, out, args, ids = small_job
    parts = part_mtimes(out)
    new_docs = make_docs(30, seed=21, start=200)
    write_jsonl(corpus / "more.jsonl", new_docs)
    shard_flag = args.index("--shard-size")
    rerun = [*args[:shard_flag], "--shard-size", "10", *args[shard_flag + 2 :]]
    run_ok(*rerun)
    after = part_mtimes(out)
    assert {k: after[k] for k in parts} == parts
    assert len(after) == len(parts) + 3  # 30 new rows in shards of 10
    assert_ids_once(read_vectors(out), ids + [d["id"] for d in new_docs])
