"""Bad input through ``embed-corpus run``: a clear error naming file, row and field, before any model work;
``--on-bad-record skip`` records the bad rows in ``OUTPUT/rejects/`` and embeds the rest; nothing already
written is ever lost."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import (
    ModelGuard,
    assert_ids_once,
    done_markers,
    embed_args,
    invoke,
    make_docs,
    part_mtimes,
    read_vectors,
    run_ok,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny batches: see conftest


GOOD = '{"id": "g%d", "text": "a good document"}'


def good_lines(n: int, start: int = 0) -> list[str]:
    return [GOOD % i for i in range(start, start + n)]


def assert_fails_before_model(tmp_path: Path, guard: ModelGuard, inputs: list[Path], *needles: str,
                              extra: tuple[str, ...] = ()) -> str:
    """The run exits non-zero with one error line that contains every needle, and never loads the model."""
    result = invoke(*embed_args(inputs, tmp_path / "out", *extra))
    assert guard.calls == 0, "the model was loaded before the bad input was found"
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f"crashed instead of a clear error: {result.exception!r}"
    assert "Traceback" not in result.output
    message = result.output
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert not list((tmp_path / "out" / "vectors").glob("*.parquet"))
    return message


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch, minilm_dir: Path) -> ModelGuard:
    return ModelGuard(monkeypatch)


# ----------------------------------------------------------------------------------------- error: each case


def test_missing_file(tmp_path, guard):
    assert_fails_before_model(tmp_path, guard, [tmp_path / "nope.jsonl"], "nope.jsonl", "no such file")


def test_missing_file_among_good_ones(tmp_path, guard):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(3))
    assert_fails_before_model(tmp_path, guard, [good, tmp_path / "gone.parquet"], "gone.parquet")


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ('{"id": "b", "text": null}', "'text'", "null"),
        ('{"id": "b"}', "'text'", "missing"),
        ('{"id": "b", "text": ""}', "'text'", "empty"),
        ('{"id": "b", "text": "  \\n\\t "}', "'text'", "empty"),
        ('{"id": "b", "text": 42}', "'text'", "int"),
        ('{"id": "b", "text": ["a", "list"]}', "'text'", "list"),
        ('{"id": "b", "text": {"a": 1}}', "'text'", "dict"),
        ('{"id": null, "text": "x"}', "'id'", "null"),
        ('{"id": 1.5, "text": "x"}', "'id'", "float"),
        ('{"id": true, "text": "x"}', "'id'", "bool"),
        # nothing a model can read: control, NUL, zero-width characters (issue 13, item 4)
        ('{"id": "b", "text": "\\u0000\\u0000\\u0000"}', "'text'", "empty"),
        ('{"id": "b", "text": "\\u200b\\u200d \\ufeff\\u2060"}', "'text'", "empty"),
        ('{"id": "b", "text": "\\u0007\\u001b\\u00ad\\u3000"}', "'text'", "empty"),
        ('{"id": "", "text": "x"}', "'id'", "blank"),
        ('{"id": "   ", "text": "x"}', "'id'", "blank"),
        ('{"id": "\\u200b\\u0000", "text": "x"}', "'id'", "blank"),
        # a lone surrogate is valid JSON but no text: a bad row, not a UnicodeEncodeError traceback
        ('{"id": "b", "text": "half an emoji \\ud83d"}', "'text'", "lone UTF-16 surrogate"),
        ('{"id": "\\udc00", "text": "x"}', "'id'", "lone UTF-16 surrogate"),
        # nested deeper than Python's parser goes (item 5): one bad row, not a RecursionError
        ('{"id": "b", "text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", "", "nested too deeply"),
    ],
)
def test_bad_record_in_jsonl(tmp_path, guard, line, field, reason):
    path = write_jsonl(tmp_path / "corpus.jsonl", [*good_lines(4), line, *good_lines(2, 10)], raw_lines=True)
    message = assert_fails_before_model(tmp_path, guard, [path], str(path), "line 5", field, reason)
    assert "--on-bad-record skip" in message  # says how to proceed


def test_invalid_json_line(tmp_path, guard):
    path = write_jsonl(tmp_path / "c.jsonl", [*good_lines(4), '{"id": "b", "text": "unterminated', *good_lines(1, 9)],
                       raw_lines=True)
    message = assert_fails_before_model(tmp_path, guard, [path], str(path), "line 5", "invalid JSON")
    # the decoder's own position ("line 1 column 32") must not read as another line of the file
    assert "line 1 column" not in message and "line 2 column" not in message


def test_non_object_json_line(tmp_path, guard):
    path = write_jsonl(tmp_path / "c.jsonl", [*good_lines(2), "[1, 2, 3]"], raw_lines=True)
    assert_fails_before_model(tmp_path, guard, [path], str(path), "line 3", "object")


def test_wrong_text_field_jsonl(tmp_path, guard):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(5))
    assert_fails_before_model(tmp_path, guard, [path], str(path), "line 1", "'body'", extra=("--text-field", "body"))


def test_bad_gzip_jsonl_line(tmp_path, guard):
    path = write_jsonl(tmp_path / "c.jsonl.gz", [*good_lines(7), '{"id": "x", "text": null}'], raw_lines=True)
    assert_fails_before_model(tmp_path, guard, [path], str(path), "line 8", "'text'")


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        (pa.table({"id": ["a", "b", "c"], "text": ["x", None, "z"]}), ["row 1", "'text'", "null"]),
        (pa.table({"id": ["a", "b", "c"], "text": ["x", "y", " "]}), ["row 2", "'text'", "empty"]),
        (pa.table({"id": ["a", None, "c"], "text": ["x", "y", "z"]}), ["row 1", "'id'", "null"]),
        (pa.table({"id": ["a", "b"], "body": ["x", "y"]}), ["row 0", "'text'", "missing"]),
        (pa.table({"id": ["a", "b"], "text": [1, 2]}), ["'text'", "int64"]),
        (pa.table({"id": [1.0, 2.0], "text": ["x", "y"]}), ["'id'", "double"]),
        (pa.table({"id": ["a", "b", "c"], "text": ["x", "\x00\u200b", "z"]}), ["row 1", "'text'", "empty"]),
        (pa.table({"id": ["a", "", "c"], "text": ["x", "y", "z"]}), ["row 1", "'id'", "blank"]),
        (pa.table({"id": ["a", "b", " \t"], "text": ["x", "y", "z"]}), ["row 2", "'id'", "blank"]),
        # any bytes stored as a string by a writer that does not check: a bad row, not a UnicodeDecodeError
        (pa.table({"id": ["a", "b", "c"], "text": pa.array([b"x", b"bad \xff\xfe", b"z"]).view(pa.string())}),
         ["row 1", "'text'", "not valid UTF-8"]),
        (pa.table({"id": pa.array([b"a", b"\xc3", b"c"]).view(pa.string()), "text": ["x", "y", "z"]}),
         ["row 1", "'id'", "not valid UTF-8"]),
    ],
)
def test_bad_record_in_parquet(tmp_path, guard, table, needles):
    path = write_parquet(tmp_path / "c.parquet", table)
    assert_fails_before_model(tmp_path, guard, [path], str(path), *needles)


def test_bad_row_in_a_later_row_group(tmp_path, guard):
    docs = make_docs(100)
    docs[73]["text"] = None
    path = write_parquet(tmp_path / "c.parquet", docs, row_groups=[30, 30, 40])
    assert_fails_before_model(tmp_path, guard, [path], str(path), "row 73", "'text'", extra=("--shard-size", "30"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_parquet(tmp_path, guard, damage):
    good = write_parquet(tmp_path / "good.parquet", make_docs(20))
    data = good.read_bytes()
    bad = tmp_path / "bad.parquet"
    damaged = {"garbage": b"this is not parquet " * 50, "truncated": data[: len(data) // 2], "empty": b""}
    bad.write_bytes(damaged[damage])
    assert_fails_before_model(tmp_path, guard, [good, bad], str(bad), "Parquet")


def test_unreadable_gzip(tmp_path, guard):
    bad = tmp_path / "c.jsonl.gz"
    bad.write_bytes(b"not gzip at all\n")
    assert_fails_before_model(tmp_path, guard, [bad], str(bad))


def test_duplicate_ids_within_a_file(tmp_path, guard):
    path = write_jsonl(tmp_path / "c.jsonl", [*good_lines(5), GOOD % 2], raw_lines=True)
    message = assert_fails_before_model(tmp_path, guard, [path], str(path), "line 6", "'id'", "duplicate", "'g2'")
    assert "line 3" in message  # where the first one is


def test_duplicate_ids_across_files(tmp_path, guard):
    a = write_parquet(tmp_path / "a.parquet", make_docs(50))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(3, start=100) + [make_docs(50)[17]])
    message = assert_fails_before_model(tmp_path, guard, [a, b], str(b), "line 4", "'id'", "'doc17'")
    assert f"{a}: row 17" in message


def test_duplicate_int_and_string_ids(tmp_path, guard):
    # 7 and "7" are the same id once ids are strings
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "text": "x"}, {"id": "7", "text": "y"}])
    assert_fails_before_model(tmp_path, guard, [path], str(path), "line 2", "duplicate")


# --------------------------------------------------------------------------------- runs that load the model


def test_duplicate_ids_across_an_incremental_run_and_nothing_is_lost(tmp_path, minilm_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "day1.jsonl", make_docs(40))
    out = tmp_path / "out"
    args = embed_args([corpus], out, "--shard-size", "16")
    run_ok(*args)
    before_parts, before_markers = part_mtimes(out), [p.name for p in done_markers(out)]
    before_manifest = (out / "manifest.json").read_bytes()
    before = read_vectors(out)
    assert len(before_parts) == 3 and len(before_markers) == 3

    # day 2 repeats an id of day 1: refused, before the model is loaded, naming both places
    write_jsonl(corpus / "day2.jsonl", make_docs(5, start=40) + [make_docs(40)[3]])
    guard = ModelGuard(monkeypatch)
    result = invoke(*args)
    assert guard.calls == 0
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    for needle in ("day2.jsonl", "line 6", "'id'", "duplicate id 'doc3'", "day1.jsonl: line 4"):
        assert needle in result.output

    # nothing already written is lost or changed
    assert part_mtimes(out) == before_parts
    assert [p.name for p in done_markers(out)] == before_markers
    assert (out / "manifest.json").read_bytes() == before_manifest
    assert read_vectors(out).equals(before)
    monkeypatch.undo()

    # fixed: the new file is embedded incrementally
    write_jsonl(corpus / "day2.jsonl", make_docs(6, start=40))
    run_ok(*args)
    assert_ids_once(read_vectors(out), [d["id"] for d in make_docs(46)])
    assert {k: v for k, v in part_mtimes(out).items() if k in before_parts} == before_parts


def test_bad_file_added_later_loses_nothing(tmp_path, minilm_dir):
    corpus = tmp_path / "corpus"
    write_parquet(corpus / "a.parquet", make_docs(30))
    out = tmp_path / "out"
    args = embed_args([corpus], out, "--shard-size", "10")
    run_ok(*args)
    parts, markers, vectors = part_mtimes(out), done_markers(out), read_vectors(out)
    (corpus / "b.parquet").write_bytes(b"garbage")
    result = invoke(*args)
    assert result.exit_code == 1 and "b.parquet" in result.output
    assert part_mtimes(out) == parts and done_markers(out) == markers
    assert read_vectors(out).equals(vectors)
    from pipeline.job.status import job_status

    st = job_status(out)
    assert (st.shards_done, st.shards_pending, st.docs_done) == (3, 0, 30)


def test_skip_records_rejects_and_embeds_the_rest(tmp_path, minilm_dir):
    lines = [
        GOOD % 0,
        '{"id": "b1", "text": null}',  # row 1
        GOOD % 2,
        '{"id": "b3", "text": ""}',  # row 3
        '{"id": "b4", "text": 5}',  # row 4
        GOOD % 5,
        "{not json",  # row 6
        GOOD % 7,
        GOOD % 0,  # row 8: duplicate of row 0
        GOOD % 9,
        '{"id": null, "text": "no id"}',  # row 10
        GOOD % 11,
        '{"id": "b12", "text": "   "}',  # row 12
        GOOD % 13,
        '{"id": "b14", "text": "\\u0000\\u200b"}',  # row 14: nothing but NUL and a zero-width space
        '{"id": " ", "text": "a blank id"}',  # row 15
        '{"id": "b16", "text": ' + "[" * 50_000 + "]" * 50_000 + "}",  # row 16: nested too deeply to parse
    ]
    good = ["g0", "g2", "g5", "g7", "g9", "g11", "g13", "p0", "p3"]
    a = write_jsonl(tmp_path / "in" / "a.jsonl", lines, raw_lines=True)
    b = write_parquet(tmp_path / "in" / "b.parquet",
                      pa.table({"id": ["p0", "p1", "g7", "p3"], "text": ["x", None, "dup of a.jsonl", "y"]}))
    out = tmp_path / "out"
    args = embed_args([tmp_path / "in"], out, "--on-bad-record", "skip", "--shard-size", "2")
    run_ok(*args)

    assert_ids_once(read_vectors(out), good)
    rejects = {}
    for path in sorted((out / "rejects").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rejects[(Path(r["file"]).name, r["row"])] = r
    assert set(rejects) == ({("a.jsonl", r) for r in (1, 3, 4, 6, 8, 10, 12, 14, 15, 16)}
                            | {("b.parquet", 1), ("b.parquet", 2)})
    assert all(r["reason"] for r in rejects.values())
    assert rejects[("a.jsonl", 1)]["field"] == "text" and "null" in rejects[("a.jsonl", 1)]["reason"]
    assert "empty" in rejects[("a.jsonl", 3)]["reason"] and "empty" in rejects[("a.jsonl", 12)]["reason"]
    assert "int" in rejects[("a.jsonl", 4)]["reason"]
    assert "invalid JSON" in rejects[("a.jsonl", 6)]["reason"]
    assert rejects[("a.jsonl", 8)]["field"] == "id" and "duplicate" in rejects[("a.jsonl", 8)]["reason"]
    assert rejects[("a.jsonl", 10)]["field"] == "id"
    assert rejects[("b.parquet", 2)]["field"] == "id" and str(a) in rejects[("b.parquet", 2)]["reason"]
    assert rejects[("b.parquet", 1)]["file"] == str(b)
    assert "empty" in rejects[("a.jsonl", 14)]["reason"] and rejects[("a.jsonl", 15)]["field"] == "id"
    assert "nested too deeply" in rejects[("a.jsonl", 16)]["reason"]

    from pipeline.job.status import job_status

    st = job_status(out)
    assert (st.docs_total, st.docs_done, st.rejected_rows, st.shards_pending) == (9, 9, 12, 0)

    # a rerun embeds nothing twice and rewrites nothing
    parts, reject_files = part_mtimes(out), {p.name: p.read_bytes() for p in (out / "rejects").iterdir()}
    result = run_ok(*args, "--no-quiet")
    assert "nothing new" in result.output
    assert part_mtimes(out) == parts
    assert {p.name: p.read_bytes() for p in (out / "rejects").iterdir()} == reject_files
    assert_ids_once(read_vectors(out), good)


def test_skip_with_a_shard_of_only_bad_rows(tmp_path, minilm_dir):
    lines = [GOOD % 0, GOOD % 1, '{"id": "b2", "text": null}', '{"id": "b3", "text": ""}', GOOD % 4]
    out = tmp_path / "out"
    run_ok(*embed_args([write_jsonl(tmp_path / "a.jsonl", lines, raw_lines=True)], out,
                       "--on-bad-record", "skip", "--shard-size", "2"))
    assert_ids_once(read_vectors(out), ["g0", "g1", "g4"])
    assert len(done_markers(out)) == 3


def test_skip_does_not_hide_a_wrong_text_field(tmp_path, minilm_dir):
    """With skip, a --text-field that no row has must not give an empty output that looks like success."""
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(20))
    result = invoke(*embed_args([path], tmp_path / "out", "--on-bad-record", "skip", "--text-field", "body"))
    assert result.exit_code != 0, "every row was rejected, yet the run reported success"
    assert "'body'" in result.output


# ------------------------------------------------------------------ named fields, ids and kept types (issue 13)


def _no_id(docs: list[dict]) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "id"} for d in docs]


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize(
    ("flags", "docs", "field"),
    [
        (("--text-field", "{titl} {text}"), make_docs(30), "'titl'"),  # a typo in a template
        (("--text-field", "body"), make_docs(30), "'body'"),
        (("--keep", "body"), make_docs(30), "'body'"),
        (("--id-field", "doc_key"), make_docs(30), "'doc_key'"),
        (("--id-field", "id"), _no_id(make_docs(30)), "'id'"),  # named, even as the default: it must exist
    ],
)
def test_a_named_field_in_no_jsonl_row_stops_the_plan(tmp_path, guard, policy, flags, docs, field):
    """JSONL has no schema: a field exists when at least one row has it. One that no row has is a wrong setting,
    not bad rows: the plan stops before the model loads, naming field and file, even with skip."""
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    message = assert_fails_before_model(tmp_path, guard, [path], str(path), field, "no row",
                                        extra=(*flags, "--on-bad-record", policy))
    assert message.count("error:") == 1


def test_rows_lacking_a_field_that_some_rows_have(tmp_path, minilm_dir):
    """The rule for JSONL rows without a field that other rows have: the text or an id -> a bad row; a template's
    field -> an empty part; a kept field -> null (in a column of one type across every part file)."""
    rows = [{"id": f"r{i}", "title": f"T{i}", "text": f"words {i}"} for i in range(12)]
    for i in (1, 5):
        del rows[i]["text"]
    for i in range(6):
        del rows[i]["title"]  # the kept field is absent from the whole first shard
    del rows[7]["id"]
    out = tmp_path / "out"
    run_ok(*embed_args([write_jsonl(tmp_path / "c.jsonl", rows)], out, "--keep", "title", "--shard-size", "4",
                       "--on-bad-record", "skip"))
    table = read_vectors(out)  # every part is read as one dataset: one type for "title"
    assert table.schema.field("title").type == pa.string()
    assert dict(zip(table.column("id").to_pylist(), table.column("title").to_pylist(), strict=True)) == {
        f"r{i}": (f"T{i}" if i >= 6 else None) for i in range(12) if i not in (1, 5, 7)}
    reasons = {json.loads(line)["row"]: json.loads(line) for line in (out / "rejects" / "00000.jsonl").open()}
    assert set(reasons) == {1, 5, 7}
    assert reasons[1]["field"] == "text" and "missing" in reasons[1]["reason"]
    assert reasons[7]["field"] == "id" and "missing" in reasons[7]["reason"]


def test_kept_values_of_another_type_are_bad_rows(tmp_path, minilm_dir, monkeypatch):
    """A kept field holds one type: a JSONL row whose value has another JSON type is a bad row named by file, line
    and field (skippable), not an error that names neither (issue 13, item 8). (A Parquet column has one type; a
    kept column whose type differs between files is refused: the next tests.)"""
    rows = [{"id": f"r{i}", "text": f"words {i}", "score": i} for i in range(10)]
    rows[3]["score"] = "high"
    rows[6]["score"] = [1, 2]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    guard = ModelGuard(monkeypatch)
    message = assert_fails_before_model(tmp_path, guard, [path], str(path), "line 4", "'score'", "string",
                                        extra=("--keep", "score"))
    assert "more bad rows" in message
    monkeypatch.undo()
    out = tmp_path / "skip"
    run_ok(*embed_args([path], out, "--keep", "score", "--on-bad-record", "skip", "--shard-size", "4"))
    table = read_vectors(out)
    assert table.schema.field("score").type == pa.int64()
    assert sorted(table.column("score").to_pylist()) == [0, 1, 2, 4, 5, 7, 8, 9]
    rejected = [json.loads(line) for line in (out / "rejects" / "00000.jsonl").open()]
    assert [(r["row"], r["field"]) for r in rejected] == [(3, "score"), (6, "score")]


def test_kept_json_types_become_one_column_type(tmp_path, minilm_dir):
    """Integers and numbers make a float64 column; objects and arrays are kept as their JSON text."""
    rows = [{"id": f"r{i}", "text": f"w {i}", "score": i if i % 2 else i + 0.5, "meta": {"n": i} if i % 3 else [i]}
            for i in range(9)]
    out = tmp_path / "out"
    run_ok(*embed_args([write_jsonl(tmp_path / "c.jsonl", rows)], out, "--keep", "score", "--keep", "meta",
                       "--shard-size", "2"))
    table = read_vectors(out)
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("meta").type == pa.string()
    got = {i: (s, json.loads(m)) for i, s, m in zip(table.column("id").to_pylist(), table.column("score").to_pylist(),
                                                     table.column("meta").to_pylist(), strict=True)}
    assert got == {f"r{i}": (float(r["score"]), r["meta"]) for i, r in enumerate(rows)}


def test_kept_column_of_another_type_in_another_file_is_refused(tmp_path, guard):
    a = write_parquet(tmp_path / "in" / "a.parquet", pa.table({"id": ["a1", "a2"], "text": ["x", "y"],
                                                                "year": pa.array([1999, 2001], pa.int64())}))
    b = write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "b1", "text": "z", "year": "MCMXCIX"}])
    message = assert_fails_before_model(tmp_path, guard, [a, b], str(b), "'year'", "int64", str(a),
                                        extra=("--keep", "year", "--on-bad-record", "skip"))
    assert "one type" in message


@pytest.mark.parametrize(
    ("second", "needles"),
    [
        (pa.table({"id": ["7", "8"], "text": ["x", "y"]}), ["integers", "strings", '"7"']),
        (pa.table({"text": ["x", "y"]}), ["no 'id' field", "generated", "FILE#ROW"]),
    ],
)
def test_ids_of_parquet_files_of_different_schemas_are_refused(tmp_path, guard, second, needles):
    """Int ids in one file and string ids in another would make 7 and "7" one id; generated FILE#ROW ids would mix
    with real ones: the rule is one id source and one id type per output (issue 13, item 11)."""
    a = write_parquet(tmp_path / "in" / "a.parquet", pa.table({"id": [7, 9], "text": ["x", "y"]}))
    b = write_parquet(tmp_path / "in" / "b.parquet", second)
    message = assert_fails_before_model(tmp_path, guard, [tmp_path / "in"], str(a), str(b), *needles,
                                        extra=("--on-bad-record", "skip"))
    assert message.count("error:") == 1


def test_ids_of_a_new_file_must_match_the_earlier_runs(tmp_path, minilm_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    write_parquet(corpus / "day1.parquet", pa.table({"id": [1, 2, 3], "text": ["x", "y", "z"]}))
    out = tmp_path / "out"
    args = embed_args([corpus], out)
    run_ok(*args)
    write_jsonl(corpus / "day2.jsonl", [{"id": "4", "text": "w"}])
    guard = ModelGuard(monkeypatch)
    result = invoke(*args)
    assert guard.calls == 0 and result.exit_code == 1
    assert "day1.parquet" in result.output and "day2.jsonl" in result.output and "integers" in result.output
    (corpus / "day2.jsonl").unlink()
    write_jsonl(corpus / "day2.jsonl", [{"id": 4, "text": "w"}])  # integers, as on day 1: accepted
    monkeypatch.undo()
    run_ok(*args)
    assert_ids_once(read_vectors(out), ["1", "2", "3", "4"])


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_broken_symlink_in_an_input_directory(tmp_path, guard, kind):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "good.jsonl", make_docs(3))
    if kind == "loop":
        (corpus / "a.jsonl").symlink_to(corpus / "b.jsonl")
        (corpus / "b.jsonl").symlink_to(corpus / "a.jsonl")
    else:
        (corpus / "a.jsonl").symlink_to(tmp_path / "gone.jsonl")
    needle = "loops" if kind == "loop" else "does not exist"
    message = assert_fails_before_model(tmp_path, guard, [corpus], str(corpus / "a.jsonl"), needle)
    assert message.count("error:") == 1


def test_a_folder_symlink_loop_is_not_followed(tmp_path, minilm_dir):
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "sub" / "good.jsonl", make_docs(3))
    (corpus / "sub" / "up").symlink_to(corpus)  # a loop through a folder
    out = tmp_path / "out"
    run_ok(*embed_args([corpus], out))
    assert_ids_once(read_vectors(out), [d["id"] for d in make_docs(3)])


# ---------------------------------------------------------------------------------------------- a full disk


def _one_error_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _invoke_within(seconds: int, *args):
    """``invoke``, failing the test (instead of hanging the whole run) when it does not end in time."""
    import signal

    class Hung(Exception):
        pass

    def alarm(*_):
        raise Hung(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        result = invoke(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not isinstance(result.exception, Hung), f"the run hung: {result.exception}"
    return result


@pytest.mark.parametrize("failing", [3, 5])
def test_full_disk_while_writing_a_part(tmp_path, minilm_dir, monkeypatch, failing):
    """ENOSPC as PyArrow raises it, on a middle part or on the last one (whose failure no later shard reveals): one
    error line naming the part, the free space and the space needed, exit code 74, no hang; nothing finished is
    lost, no partial file is left, and the rerun finishes."""
    import pyarrow.parquet as pq

    docs = make_docs(50)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "out"
    args = embed_args([path], out, "--shard-size", "10")
    real, calls = pq.write_table, []

    def full_on_one(table, where, **kwargs):
        name = Path(where).name
        if name.startswith(".part-") and ".docs." not in name:  # the part files (not scans, plans, indexes)
            calls.append(where)
        if len(calls) == failing and calls[-1] == where:
            Path(where).write_bytes(b"partial")
            raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_on_one)
    line = _one_error_line(_invoke_within(120, *args), 74, "no space left", f"part-00000{failing - 1}.parquet",
                           "free there", "needed")
    assert "rerun" in line
    assert len(done_markers(out)) == failing - 1
    assert not [p for p in (out / "parts").iterdir() if p.name.startswith(".")], "a partial file was left"
    monkeypatch.undo()
    run_ok(*args)
    assert_ids_once(read_vectors(out), [d["id"] for d in docs])


def test_full_disk_while_planning(tmp_path, minilm_dir, monkeypatch):
    """ENOSPC on the first fsync of planning (the input's scan): one error line naming the file, exit code 74, no
    temporary file left, no manifest written."""
    import os

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    guard = ModelGuard(monkeypatch)
    out = tmp_path / "out"
    result = invoke(*embed_args([write_jsonl(tmp_path / "c.jsonl", make_docs(5))], out))
    assert guard.calls == 0
    _one_error_line(result, 74, "no space left", str(out / "plan" / "scans"), "free there")
    assert not list(out.rglob(".*.tmp-*")) and not (out / "manifest.json").exists()


def test_full_disk_in_the_index_step(tmp_path, minilm_dir, monkeypatch):
    """faiss says it in a RuntimeError: still one error line naming the index file, exit code 74."""
    import faiss

    def full(index, path):
        raise RuntimeError(f"Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: "
                           f"Error: 'ret == (size * 4)' failed: write error in {path}: 4051 != 2560000 "
                           "(No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full)
    out = tmp_path / "out"
    result = invoke(*embed_args([write_jsonl(tmp_path / "c.jsonl", make_docs(20))], out, "--index"))
    _one_error_line(result, 74, "index:", "no space left", str(out / "index"), "free there")
    assert len(done_markers(out)) == 1  # the vectors are kept


def _tmpfs(path: Path, size: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_real_full_disk(tmp_path, minilm_dir, workers):
    """The output on a tiny tmpfs (needs root; skipped elsewhere): exit 74 with one error line, in the single worker
    and with --workers; after the disk grows, the same command finishes with every id once."""
    import subprocess
    import sys

    from helpers import subprocess_env

    disk = tmp_path / "disk"
    if not _tmpfs(disk, "400k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        docs = make_docs(300, seed=3)
        path = write_jsonl(tmp_path / "c.jsonl", docs)
        args = embed_args([path], disk / "out", "--shard-size", "100", "--workers", str(workers))
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 74, proc.stderr
        assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
        assert "no space left" in errors[0] and str(disk) in errors[0] and "free there" in errors[0]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert_ids_once(read_vectors(disk / "out"), [d["id"] for d in docs])
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
