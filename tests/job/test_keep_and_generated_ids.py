"""Inputs that gave wrong output with exit 0: kept columns named like the job's own (id, text, vectors), generated
ids of same-named files in different folders, a kept column's type after a rename."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers import (
    embed_args,
    invoke,
    make_docs,
    read_vectors,
    run_ok,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize(("extra", "column"), [
    (("--text-field", "body", "--keep", "text"), "text"),  # the embedded text was the kept `text`, not `body`
    (("--text-field", "{title} {text}", "--keep", "text"), "text"),  # ... not the template
    (("--id-field", "doc_id", "--keep", "id"), "id"),  # the ids were the kept `id` column's
    (("--keep", "embedding"), "embedding"),  # the output's vectors were the input column's
    (("--keep", "n_tokens"), "n_tokens"),
])
def test_keep_of_a_column_the_job_writes_itself_is_refused(tmp_path, extra, column):
    """A kept column named like the id, the text or an output column replaced it, and the run exited 0 (the scan
    hashed the same replaced values, so the plan and the commit's checks agreed). Now the run is refused before
    anything is read, naming the column."""
    rows = [{"id": d["id"], "doc_id": f"D{i}", "body": d["text"], "text": f"unrelated note {i}", "title": d["title"],
             "embedding": [0.5] * 4, "n_tokens": 3} for i, d in enumerate(make_docs(4, seed=11))]
    corpus = write_parquet(tmp_path / "in" / "docs.parquet", rows)
    result = invoke(*embed_args([corpus], tmp_path / "out", *extra))
    assert result.exit_code != 0 and f"keep: {column!r}" in result.output, result.output
    assert not (tmp_path / "out" / "vectors").exists()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_generated_ids_of_same_named_files_from_a_glob_are_refused(tmp_path, minilm_dir, policy):
    """`--input 'in/*/docs.jsonl'` over monthly folders that each hold a `docs.jsonl` without ids: both files'
    rows got the ids `docs.jsonl#ROW`, and with `skip` the second file's rows were dropped as duplicates, exit 0.
    Now the plan is refused, naming both files; their common folder as the input keys them apart."""
    jan = [{"text": d["text"]} for d in make_docs(3, seed=15)]
    feb = [{"text": d["text"] + " february"} for d in make_docs(3, seed=16)]
    write_jsonl(tmp_path / "in" / "2024-01" / "docs.jsonl", jan)
    write_jsonl(tmp_path / "in" / "2024-02" / "docs.jsonl", feb)
    out = tmp_path / "out"
    result = invoke(*embed_args([tmp_path / "in" / "*" / "docs.jsonl"], out, "--on-bad-record", policy))
    assert result.exit_code != 0 and "collide" in result.output and "2024-02" in result.output, result.output
    run_ok(*embed_args([tmp_path / "in"], out, "--on-bad-record", policy))
    assert sorted(read_vectors(out).column("id").to_pylist()) == [f"2024-0{m}/docs.jsonl#{r}" for m in (1, 2)
                                                                  for r in range(3)]


def test_keep_of_chunk_columns_is_refused_only_when_chunking(tmp_path, minilm_dir):
    """A corpus chunked upstream keeps its own `chunk` column when the job does not chunk (it writes none)."""
    rows = [{"id": d["id"], "text": d["text"], "chunk": i % 2} for i, d in enumerate(make_docs(4, seed=17))]
    corpus = write_parquet(tmp_path / "in" / "docs.parquet", rows)
    run_ok(*embed_args([corpus], tmp_path / "out", "--keep", "chunk"))
    assert read_vectors(tmp_path / "out").column("chunk").to_pylist() is not None
    result = invoke(*embed_args([corpus], tmp_path / "chunked", "--keep", "chunk", "--long-docs", "chunk"))
    assert result.exit_code != 0 and "keep: 'chunk'" in result.output


def test_a_kept_column_has_one_type_across_the_live_version(tmp_path, minilm_dir):
    """Day 1: a.parquet (int scores) and b.parquet (float scores) make the kept column float64. Day 2: b is gone and
    a renamed. Day 3: a new file with int scores. The live version's parts must agree on the column's type."""
    import pyarrow as pa

    docs = make_docs(7, seed=17)
    cols = lambda ds, scores, t: pa.table({"id": [d["id"] for d in ds], "text": [d["text"] for d in ds],  # noqa: E731
                                           "score": pa.array(scores, t)})
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(cols(docs[:3], [1, 2, 3], pa.int64()), folder / "a.parquet")
    pq.write_table(cols(docs[3:6], [0.5, 1.5, 2.5], pa.float64()), folder / "b.parquet")
    out = tmp_path / "out"
    run_ok(*embed_args([folder], out, "--keep", "score"))
    (folder / "b.parquet").unlink()
    (folder / "a.parquet").rename(folder / "a2.parquet")
    run_ok(*embed_args([folder], out, "--keep", "score"))
    pq.write_table(cols(docs[6:], [7], pa.int64()), folder / "c.parquet")
    run_ok(*embed_args([folder], out, "--keep", "score"))
    types = {str(pq.read_schema(p).field("score").type) for p in (out / "vectors").glob("*.parquet")}
    assert len(types) == 1, types


def test_generated_ids_of_two_named_files_with_one_name_do_not_collide(tmp_path, minilm_dir):
    """`--input jan/docs.jsonl --input feb/docs.jsonl --on-bad-record skip` (no ids): six documents, or a refusal;
    never three documents and the other file's rows "rejected" as duplicates."""
    jan = write_jsonl(tmp_path / "jan" / "docs.jsonl", [{"text": d["text"]} for d in make_docs(3, seed=15)])
    feb = write_jsonl(tmp_path / "feb" / "docs.jsonl", [{"text": d["text"] + " feb"} for d in make_docs(3, seed=16)])
    out = tmp_path / "out"
    result = invoke(*embed_args([jan, feb], out, "--on-bad-record", "skip"))
    assert result.exit_code != 0 and "collide" in result.output, result.output
