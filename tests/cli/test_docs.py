"""What the README and ``--help`` tell a user is what the code does: the duckdb and polars one-liners of the README
run on a real output and find the nearest neighbours a brute-force count finds; ``run --help`` shows every default
of ``JobConfig``; ``--compile``'s help and the README give the same default."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from helpers import MODEL, REPO, SENTENCES, embeddings, read_vectors, run_ok, write_jsonl

from pipeline.job.config import JobConfig

README = (REPO / "README.md").read_text(encoding="utf-8")
ROW = re.compile(r"(doc\d+)\s*[│┆|]\s*([-+0-9.e]+)")  # an id and a score in a duckdb or polars table


def _readme_block(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"the README should have one python block starting with {first_line!r}"
    return found[0]


@pytest.fixture(scope="module")
def small_output(tmp_path_factory: pytest.TempPathFactory, minilm_dir) -> tuple[str, dict[str, np.ndarray]]:
    """A MiniLM output (384 dims, as the demo's) of the test sentences, and its vectors by id."""
    tmp = tmp_path_factory.mktemp("docs")
    corpus = write_jsonl(tmp / "c.jsonl", [{"id": f"doc{i}", "text": t} for i, t in enumerate(SENTENCES)])
    out = tmp / "out"
    run_ok("run", "--input", corpus, "--output", out, "--model", MODEL, "--device", "cpu", "--quiet",
           "--shard-size", "5")
    table = read_vectors(out)
    return str(out), dict(zip(table.column("id").to_pylist(), embeddings(table), strict=True))


@pytest.mark.parametrize("library", ["duckdb", "polars"])
def test_readme_one_liners_find_the_nearest_neighbours(library, small_output, capfd) -> None:
    pytest.importorskip(library, reason=f"{library} is not installed (CI installs it: the `ci` extra)")
    out, vectors = small_output
    code = _readme_block(f"import {library}")
    assert "out/demo/vectors/*.parquet" in code and "'code:fileinput.py'" in code.replace('"', "'")
    query = "doc5"
    code = code.replace("out/demo", out).replace("code:fileinput.py", query)
    exec(compile(code, f"README.md ({library})", "exec"), {})
    printed = capfd.readouterr().out
    rows = [(m.group(1), float(m.group(2))) for m in ROW.finditer(printed)]
    # brute force: cosine of the query document with every document, best first
    ids = sorted(vectors)
    mat = np.stack([vectors[i] for i in ids])
    cos = mat @ vectors[query] / (np.linalg.norm(mat, axis=1) * np.linalg.norm(vectors[query]))
    order = np.argsort(-cos, kind="stable")[:5]
    assert [r[0] for r in rows] == [ids[j] for j in order], printed
    np.testing.assert_allclose([r[1] for r in rows], cos[order], atol=1e-5)
    assert rows[0] == (query, pytest.approx(1.0, abs=1e-5))


def _help_entries(*command: str) -> dict[str, str]:
    """``--flag`` -> its help entry, unwrapped (an entry starts on a line that starts with an option)."""
    entries: dict[str, str] = {}
    current = None
    for line in run_ok(*command, "--help").output.splitlines():
        m = re.match(r"^  (--[a-z-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = ""
        if current:
            entries[current] += " " + line.strip()
    # click wraps at 80 columns, also after a hyphen: "no-\ntrust-remote-code"
    return {k: " ".join(v.split()).replace("- ", "-") for k, v in entries.items()}


def test_run_help_shows_every_default() -> None:
    entries = _help_entries("run")
    checked = 0
    for f in dataclasses.fields(JobConfig):
        if f.metadata.get("cli") is False or f.default in ((), ""):  # inputs, output, model: no default
            continue
        entry = entries["--" + f.name.replace("_", "-")]
        if "default:" in f.metadata.get("help", "").lower():  # said in words, e.g. "(default: the model's limit)"
            assert "default:" in entry.lower() and "[default:" not in entry, entry
            continue
        name = f.name.replace("_", "-")
        expected = ("none" if f.default is None else (name if f.default else f"no-{name}")
                    if isinstance(f.default, bool) or f.default is None else str(f.default))
        assert entry.endswith(f"[default: {expected}]"), entry
        checked += 1
    assert checked >= 15
    assert entries["--normalize"].endswith("[default: normalize]")
    assert entries["--quiet"].endswith("[default: no-quiet]")
    assert entries["--dims"].endswith("default: all of the model's).")


def test_compile_default_agrees_between_help_and_readme() -> None:
    entry = _help_entries("run")["--compile"]
    row = next(line for line in README.splitlines() if line.startswith("| `--compile/--no-compile`"))
    # both say: on where the packed forward runs on CUDA, i.e. for Qwen models on a GPU
    for words in ("CUDA", "Qwen models on a GPU"):
        assert words in entry and words in row, (entry, row)
