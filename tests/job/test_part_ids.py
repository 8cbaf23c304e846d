"""Part ids past six digits: ids only grow (every nightly run takes new ones, a part losing a row is written again
under a new id), so an output nightly for years reaches part 1,000,000, whose name has seven digits. Simulated by
raising ``OUTPUT/.next-id``, which every plan takes as its lowest id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import embed_args, invoke, make_docs, run_ok, write_jsonl

from pipeline.index.search import Searcher
from pipeline.index.vectors import complete_parts
from pipeline.job.sink import part_number
from pipeline.job.versions import max_part_id

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_part_ids_past_999999_are_read_whole(tmp_path: Path) -> None:
    """The ids were read back from the names by a six-character slice: part 1,000,000 was taken for part 100,000,
    so search showed another document's text under the right id, and garbage collection deleted a live part's
    document index (the next rewrite of that part failed), all with exit 0."""
    inp, out = tmp_path / "in", tmp_path / "out"
    out.mkdir()
    texts = [d["text"] + f" w{i}" for i, d in enumerate(make_docs(12, seed=9))]
    write_jsonl(inp / "a.jsonl", [{"id": f"old{i}", "text": texts[i]} for i in range(4)])
    (out / ".next-id").write_text("100000")
    run_ok(*embed_args([inp], out, "--shard-size", "2"))
    (out / ".next-id").write_text("999999")  # many nights later
    new = [{"id": f"new{i}", "text": texts[4 + i]} for i in range(4)]
    write_jsonl(inp / "b.jsonl", new)
    run_ok(*embed_args([inp], out, "--shard-size", "2"))

    live = Path(os.path.realpath(out / "vectors"))
    names = {p.name: int(p.name.split("-")[1].split(".")[0]) for p in live.glob("part-*.parquet")}
    assert max(names.values()) >= 1_000_000 and min(names.values()) < 1_000_000
    parts = complete_parts(out)
    assert {p.name: p.shard for p in parts} == names
    assert [p.shard for p in parts] == sorted(names.values())  # part-id order, not name order
    assert max_part_id(out) == max(names.values()) and part_number(Path("part-1000000.docs.parquet")) == 1_000_000

    assert invoke("index", "build", str(out), "--factory", "Flat", "--query-side-queries", "0").exit_code == 0
    found = Searcher(out).search([d["text"] for d in new], k=1)
    assert [(r["results"][0]["id"], r["results"][0]["text"]) for r in found] == [(d["id"], d["text"]) for d in new]

    # the second night's parts become garbage (the version before the live one is kept for readers; one more
    # night lets them go): only their own document indexes may go with them
    write_jsonl(inp / "b.jsonl", [])
    run_ok(*embed_args([inp], out, "--shard-size", "2"))
    for night, edited in enumerate((1, 0)):
        rows = [{"id": f"old{i}", "text": texts[i] + (f" edited {night}" if i == edited else "")} for i in range(4)]
        write_jsonl(inp / "a.jsonl", rows)
        run_ok(*embed_args([inp], out, "--shard-size", "2"))  # rewrites the first night's parts
    assert not [n for n in names.values() if n >= 1_000_000 and (out / "parts" / f"part-{n}.docs.parquet").exists()]
    assert all((out / "parts" / f"part-{p.shard:06d}.docs.parquet").exists() for p in complete_parts(out))
