"""The output folder is the job's: a folder that holds anything else is refused before a file in it changes.

``--overwrite`` deleted every file of whatever folder ``--output`` named (the input corpus itself, with
``--output`` = ``--input``), and a plain run took a user's own ``plan/`` and ``versions/`` folders for an
interrupted discard's leftovers and deleted them, exit 0. An output folder inside the input folder was read as
input on the next run (its parts and plan files) and failed it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    assert_ids_once,
    assert_same_vectors,
    embed_args,
    invoke,
    make_docs,
    read_vectors,
    run_ok,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("minilm_dir")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_is_not_an_output(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", make_docs(6))
    mine = tmp_path / "mine"
    write_jsonl(mine / "a.jsonl", make_docs(3))
    (mine / "sub").mkdir()
    (mine / "sub" / "notes.txt").write_text("keep me")
    before = _files(mine)
    result = invoke(*embed_args([corpus], mine, "--overwrite"))
    assert result.exit_code != 0 and "not an embed-corpus output" in result.output
    assert _files(mine) == before and sorted(p.name for p in mine.iterdir()) == ["a.jsonl", "sub"]


def test_output_same_as_input_is_refused_and_the_input_kept(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    write_jsonl(corpus / "docs.jsonl", make_docs(6))
    before = _files(corpus)
    result = invoke(*embed_args([corpus], corpus, "--overwrite"))
    assert result.exit_code != 0 and "not an embed-corpus output" in result.output
    assert _files(corpus) == before


def test_a_users_plan_and_versions_folders_are_not_taken_for_leftovers(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", make_docs(6))
    mine = tmp_path / "mine"
    for name in ("plan/q3.txt", "versions/v1.txt"):
        (mine / name).parent.mkdir(parents=True)
        (mine / name).write_text("keep me")
    before = _files(mine)
    result = invoke(*embed_args([corpus], mine))
    assert result.exit_code != 0 and "plan, versions" in result.output
    assert _files(mine) == before


def test_outputs_and_empty_folders_are_taken(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "in" / "docs.jsonl", make_docs(6))
    empty = tmp_path / "empty"
    empty.mkdir()
    run_ok(*embed_args([corpus], empty))
    run_ok(*embed_args([corpus], empty, "--overwrite"))  # its own output: discarded and made again
    assert_ids_once(read_vectors(empty), [f"doc{i}" for i in range(6)])
    planned = tmp_path / "planned"  # --plan-only first (it caches its scans in the output), then the run
    run_ok(*embed_args([corpus], planned, "--plan-only"))
    run_ok(*embed_args([corpus], planned))
    first_night = tmp_path / "first-night"  # what nightly.sh makes before the first run: its log and lock
    (first_night / "logs").mkdir(parents=True)
    (first_night / "logs" / "nightly.log").write_text("start\n")
    (first_night / ".nightly.lock").touch()
    run_ok(*embed_args([corpus], first_night))


def test_an_output_inside_the_input_folder_is_not_read_as_input(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    write_jsonl(corpus / "docs.jsonl", make_docs(8))
    out, fresh = corpus / "out", tmp_path / "fresh"
    run_ok(*embed_args([corpus], out))
    first = read_vectors(out)
    run_ok(*embed_args([corpus], out))  # the second run read out/parts and out/plan as input and failed
    write_jsonl(corpus / "more.jsonl", make_docs(3, prefix="more"))
    run_ok(*embed_args([corpus], out))
    run_ok(*embed_args([corpus / "docs.jsonl", corpus / "more.jsonl"], fresh))
    assert_same_vectors(read_vectors(out), read_vectors(fresh))
    assert first.num_rows == 8
