"""The pipeline's vectors equal an independent reference computation.

The reference below is deliberately naive and written from the model facts alone (plain transformers, one
text at a time, float32, CPU, no padding, no batching):

* Qwen3-Embedding: ids = tokenizer(text, add_special_tokens=False) cut to max_length - 1, then exactly one
  ``<|endoftext|>`` (151643), whatever the tokenizer appends by itself; the hidden state of the last
  position after the final norm; L2-normalised. Queries: ``f"Instruct: {task}\\nQuery:{text}"`` tokenized as
  ONE string (no space after "Query:"). Matryoshka dims: the first N values, normalised again.
* MiniLM (BERT-style): [CLS] text [SEP] cut to 256 tokens, mean of the last hidden states under the
  attention mask, L2-normalised.

Both Qwen stand-ins are run: one whose tokenizer appends 151643 and one whose tokenizer appends nothing
(QwenLM/Qwen3-Embedding#54); the vectors must be the same for both.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModel, AutoTokenizer

ENDOFTEXT_ID = 151643
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
MIN_COSINE = 0.99999

LONG_TEXT = " ".join(
    f"Paragraph {i}: the committee reviewed proposal #{i * 37 % 101} on {['rivers', 'bridges', 'schools'][i % 3]}, "
    f"noting a cost of {i * 1234.5:.2f} EUR and a delay of {i % 7} weeks; 委员会第{i}次会议。"
    for i in range(60)
)

DOCUMENTS = {
    "en": "The quick brown fox jumps over the lazy dog.",
    "hello": "Hello world",
    "zh": "量子力学是描述微观粒子运动规律的物理学分支，与相对论一起构成现代物理学的理论基础。",
    "multi": "Grüße aus München! Здравствуйте, мир. مرحبا بالعالم 😀 日本語のテキストも少し。",
    "code": "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint(fib(10))\n",
    "punct": '(2024) "Quoted" question: what is the capital of France?',
    "digits": "Order 12345 shipped on 2024-03-17 at 09:41; total 1,299.99 USD.",
    "long": LONG_TEXT,
}

# For --max-length 16: which texts are far beyond the limit and which are well within it.
SHORT_IDS = ("en", "hello")
LONG_IDS = ("zh", "multi", "code", "punct", "digits", "long")

QWEN_DIRS = ["tiny_qwen3_dir", "tiny_qwen3_noeos_dir"]


# --- the reference -------------------------------------------------------------------------------------------


class QwenReference:
    """Naive Qwen3-Embedding reference: one text at a time, no padding, float32."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def ids(self, text: str, *, instruction: str | None = None, max_length: int | None = None) -> list[int]:
        if instruction is not None:
            text = f"Instruct: {instruction}\nQuery:{text}"
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if max_length is not None:
            ids = ids[: max_length - 1]
        return ids + [ENDOFTEXT_ID]

    def forward_ids(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            hidden = self.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        vec = hidden.double().numpy()
        return vec / np.linalg.norm(vec)

    def embed(
        self,
        text: str,
        *,
        instruction: str | None = None,
        max_length: int | None = None,
        dims: int | None = None,
    ) -> np.ndarray:
        vec = self.forward_ids(self.ids(text, instruction=instruction, max_length=max_length))
        if dims is not None:
            vec = vec[:dims]
            vec = vec / np.linalg.norm(vec)
        return vec


def minilm_reference(model_dir: Path, texts: dict[str, str]) -> dict[str, np.ndarray]:
    """Naive sentence-transformers MiniLM: one text at a time, mean pooling under the mask, normalised."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return {doc_id: _minilm_one(tokenizer, model, text) for doc_id, text in texts.items()}


def _minilm_one(tokenizer, model, text: str) -> np.ndarray:
    enc = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state[0].double()
    mask = enc["attention_mask"][0].double().unsqueeze(-1)
    vec = ((hidden * mask).sum(0) / mask.sum()).numpy()
    return vec / np.linalg.norm(vec)


@pytest.fixture(scope="module")
def qwen_refs(tiny_qwen3_dir: Path, tiny_qwen3_noeos_dir: Path) -> dict[str, QwenReference]:
    return {
        "tiny_qwen3_dir": QwenReference(tiny_qwen3_dir),
        "tiny_qwen3_noeos_dir": QwenReference(tiny_qwen3_noeos_dir),
    }


# --- running the pipeline ------------------------------------------------------------------------------------


def run_pipeline(tmp_path: Path, model_dir: Path, texts: dict[str, str], *extra: str) -> dict[str, dict]:
    """Run ``embed-corpus run`` in-process; return {id: {"embedding": ndarray, "n_tokens": int, "truncated": bool}}."""
    from pipeline.cli.main import main

    in_path = tmp_path / "input.jsonl"
    with open(in_path, "w", encoding="utf-8") as fh:
        for doc_id, text in texts.items():
            fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    out_dir = tmp_path / "out"
    args = ["run", "--input", str(in_path), "--output", str(out_dir), "--model", str(model_dir)]
    args += ["--device", "cpu", "--quiet", *extra]
    result = CliRunner().invoke(main, args)
    if result.exit_code != 0:
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"embed-corpus {' '.join(args)}\nexit code {result.exit_code}\n{result.output}\n{tb}")

    table = ds.dataset(str(out_dir / "vectors")).to_table()
    schema = table.schema
    assert pa.types.is_string(schema.field("id").type) or pa.types.is_large_string(schema.field("id").type)
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type), emb_type
    assert emb_type.value_type == pa.float32(), emb_type
    assert schema.field("n_tokens").type == pa.int32()
    assert schema.field("truncated").type == pa.bool_()

    rows = {}
    for doc_id, emb, n_tokens, truncated in zip(
        table.column("id").to_pylist(),
        table.column("embedding").to_pylist(),
        table.column("n_tokens").to_pylist(),
        table.column("truncated").to_pylist(),
        strict=True,
    ):
        assert doc_id not in rows, f"id {doc_id!r} written twice"
        vec = np.asarray(emb, dtype=np.float64)
        assert np.all(np.isfinite(vec)), doc_id
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-4, f"{doc_id}: norm {np.linalg.norm(vec)}"
        rows[doc_id] = {"embedding": vec, "n_tokens": n_tokens, "truncated": truncated}
    assert sorted(rows) == sorted(texts), "output ids differ from input ids"
    return rows


def assert_close(rows: dict[str, dict], expected: dict[str, np.ndarray], case: str) -> None:
    failures = []
    for doc_id, want in expected.items():
        got = rows[doc_id]["embedding"]
        assert got.shape == want.shape, f"{case} {doc_id}: dims {got.shape} != {want.shape}"
        cosine = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
        if not cosine >= MIN_COSINE:
            failures.append(f"{doc_id}: cosine {cosine:.6f}")
    assert not failures, f"{case}: vectors differ from the reference: " + ", ".join(failures)


# --- the reference has the power to tell right from wrong ----------------------------------------------------


def test_reference_is_sensitive(qwen_refs: dict[str, QwenReference]) -> None:
    """Guards the test's own power: small input mistakes change the tiny model's vectors a lot."""
    ref = qwen_refs["tiny_qwen3_dir"]
    text = DOCUMENTS["en"]
    right = ref.embed(text)
    vecs = np.stack([ref.embed(t) for t in DOCUMENTS.values()])
    off_diagonal = (vecs @ vecs.T)[~np.eye(len(vecs), dtype=bool)]
    assert off_diagonal.max() < 0.99
    query = ref.embed(text, instruction=DEFAULT_TASK)
    prompt_ids = ref.tokenizer(f"Instruct: {DEFAULT_TASK}\nQuery:", add_special_tokens=False).input_ids
    cases = [  # (mistake, its vector, the right vector)
        ("no EOS", ref.forward_ids(ref.tokenizer(text, add_special_tokens=False).input_ids), right),
        ("EOS twice", ref.forward_ids(ref.ids(text) + [ENDOFTEXT_ID]), right),
        ("<|im_end|> as EOS", ref.forward_ids(ref.ids(text)[:-1] + [151645]), right),
        ("first token dropped", ref.forward_ids(ref.ids(text)[1:]), right),
        ("instruction not applied", right, query),
        ("space after Query:", ref.embed(" " + text, instruction=DEFAULT_TASK), query),
        ("prompt tokenized apart from the text", ref.forward_ids(prompt_ids + ref.ids(text)), query),
    ]
    for name, wrong, reference in cases:
        cosine = float(wrong @ reference)
        assert cosine < 0.999, f"{name}: cosine {cosine}"


def test_reference_ignores_what_the_tokenizer_appends(qwen_refs: dict[str, QwenReference]) -> None:
    """Same weights, two tokenizer flavours: the reference vectors are identical."""
    for text in DOCUMENTS.values():
        a = qwen_refs["tiny_qwen3_dir"].embed(text)
        b = qwen_refs["tiny_qwen3_noeos_dir"].embed(text)
        assert np.allclose(a, b, atol=1e-6)


# --- pipeline == reference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_fixture", QWEN_DIRS)
def test_documents(request: pytest.FixtureRequest, tmp_path: Path, qwen_refs, model_fixture: str) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    ref = qwen_refs[model_fixture]
    rows = run_pipeline(tmp_path, model_dir, DOCUMENTS)
    assert_close(rows, {k: ref.embed(t) for k, t in DOCUMENTS.items()}, f"documents ({model_fixture})")
    for doc_id, text in DOCUMENTS.items():
        assert rows[doc_id]["truncated"] is False, doc_id
        assert rows[doc_id]["n_tokens"] >= len(ref.tokenizer(text, add_special_tokens=False).input_ids), doc_id


@pytest.mark.parametrize("model_fixture", QWEN_DIRS)
def test_instruction(request: pytest.FixtureRequest, tmp_path: Path, qwen_refs, model_fixture: str) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    ref = qwen_refs[model_fixture]
    rows = run_pipeline(tmp_path, model_dir, DOCUMENTS, "--instruction", DEFAULT_TASK)
    expected = {k: ref.embed(t, instruction=DEFAULT_TASK) for k, t in DOCUMENTS.items()}
    assert_close(rows, expected, f"--instruction ({model_fixture})")


@pytest.mark.parametrize("model_fixture", QWEN_DIRS)
def test_prompt_name_query(request: pytest.FixtureRequest, tmp_path: Path, qwen_refs, model_fixture: str) -> None:
    """The model's ``prompts.query`` is exactly the default instruction, so the vectors are the same."""
    model_dir = request.getfixturevalue(model_fixture)
    ref = qwen_refs[model_fixture]
    rows = run_pipeline(tmp_path, model_dir, DOCUMENTS, "--prompt-name", "query")
    expected = {k: ref.embed(t, instruction=DEFAULT_TASK) for k, t in DOCUMENTS.items()}
    assert_close(rows, expected, f"--prompt-name query ({model_fixture})")


@pytest.mark.parametrize("model_fixture", QWEN_DIRS)
def test_prompt_name_document(request: pytest.FixtureRequest, tmp_path: Path, qwen_refs, model_fixture: str) -> None:
    """The model's ``prompts.document`` is empty: the same vectors as plain documents."""
    model_dir = request.getfixturevalue(model_fixture)
    ref = qwen_refs[model_fixture]
    rows = run_pipeline(tmp_path, model_dir, DOCUMENTS, "--prompt-name", "document")
    assert_close(rows, {k: ref.embed(t) for k, t in DOCUMENTS.items()}, f"--prompt-name document ({model_fixture})")


@pytest.mark.parametrize("model_fixture", QWEN_DIRS)
def test_dims(request: pytest.FixtureRequest, tmp_path: Path, qwen_refs, model_fixture: str) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    ref = qwen_refs[model_fixture]
    rows = run_pipeline(tmp_path, model_dir, DOCUMENTS, "--dims", "32")
    expected = {k: ref.embed(t, dims=32) for k, t in DOCUMENTS.items()}
    assert_close(rows, expected, f"--dims 32 ({model_fixture})")


@pytest.mark.parametrize("model_fixture", QWEN_DIRS)
def test_max_length(request: pytest.FixtureRequest, tmp_path: Path, qwen_refs, model_fixture: str) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    ref = qwen_refs[model_fixture]
    # The test's own premise: the long texts are far over 16 tokens, the short ones well under.
    for doc_id in LONG_IDS:
        assert len(ref.tokenizer(DOCUMENTS[doc_id], add_special_tokens=False).input_ids) > 17, doc_id
    for doc_id in SHORT_IDS:
        assert len(ref.tokenizer(DOCUMENTS[doc_id], add_special_tokens=False).input_ids) < 14, doc_id

    texts = {k: DOCUMENTS[k] for k in (*SHORT_IDS, *LONG_IDS)}
    rows = run_pipeline(tmp_path, model_dir, texts, "--max-length", "16")
    assert_close(rows, {k: ref.embed(t, max_length=16) for k, t in texts.items()}, f"--max-length 16 ({model_fixture})")
    for doc_id in LONG_IDS:
        assert rows[doc_id]["truncated"] is True, doc_id
        assert rows[doc_id]["n_tokens"] <= 16, (doc_id, rows[doc_id]["n_tokens"])
    for doc_id in SHORT_IDS:
        assert rows[doc_id]["truncated"] is False, doc_id
        assert rows[doc_id]["n_tokens"] <= 16, (doc_id, rows[doc_id]["n_tokens"])


def test_minilm(tmp_path: Path, minilm_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    assert len(tokenizer(LONG_TEXT).input_ids) > 256  # premise: the long text is truncated at 256
    rows = run_pipeline(tmp_path, minilm_dir, DOCUMENTS)
    assert_close(rows, minilm_reference(minilm_dir, DOCUMENTS), "MiniLM")
    assert rows["long"]["truncated"] is True
    assert rows["long"]["n_tokens"] <= 256
    assert rows["hello"]["truncated"] is False
