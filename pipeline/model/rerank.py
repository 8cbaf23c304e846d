"""Rerankers: re-score (query, document) pairs with a cross-encoder for two-stage retrieval.

Two kinds, told apart by the checkpoint's architecture:

* **Qwen3-Reranker** (a causal LM, ``*ForCausalLM``): the pair is framed with the model's exact prompt::

      <|im_start|>system\\nJudge whether the Document meets the requirements based on the Query and the Instruct
      provided. Note that the answer can only be "yes" or "no".<|im_end|>\\n<|im_start|>user\\n
      <Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}
      <|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n

  and scored by the next-token logits at the last position: ``softmax([logit("no"), logit("yes")])[1]``
  (token ids 2152 and 9693 in the Qwen vocabulary). Only the pair text in the middle is truncated, to
  ``max_length - len(prefix) - len(suffix)`` tokens (from the end, as the reference code does), the tokenizer adds
  no end token, and batches are padded on the left so the last position is every sequence's own.
* **Sequence-classification cross-encoders** (``*ForSequenceClassification``, e.g. ms-marco MiniLM): the
  tokenizer's pair encoding, truncated longest-first; the score is ``sigmoid(logit)`` for one label (the
  sentence-transformers default) or the softmax probability of label 1 for two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.model.encoder import default_device, resolve_model_path
from pipeline.model.identity import own_weights

log = logging.getLogger(__name__)

QWEN_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN_MAX_LENGTH = 8192


def qwen_pair_text(query: str, doc: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The middle of the Qwen3-Reranker prompt (between the fixed prefix and suffix)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


class Reranker:
    """Scores (query, document) pairs; larger is more relevant. Build with ``load_reranker``.

    Attributes:
        kind: ``qwen-yes-no`` or ``cross-encoder``.
        model_name: what the user asked for.
    """

    kind = "base"

    def __init__(self, model, tokenizer, model_name: str, device: str, max_length: int, batch_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        """float32 (len(docs),): one score per document for ``query``."""
        return self.score_pairs([(query, d) for d in docs])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """float32 (len(pairs),), in the order given; batches are formed from pairs of similar length."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        encoded = self._encode(pairs)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        out = np.empty(len(pairs), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._score_batch([encoded[i] for i in idx])
        return out

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        raise NotImplementedError

    def _score_batch(self, batch: list[Any]) -> np.ndarray:
        raise NotImplementedError


class QwenReranker(Reranker):
    """Qwen3-Reranker yes/no scoring (see the module docstring)."""

    kind = "qwen-yes-no"

    def __init__(self, *args: Any, instruction: str = DEFAULT_INSTRUCTION, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tok = self.tokenizer
        self.instruction = instruction
        self.prefix_ids = tok(QWEN_PREFIX, add_special_tokens=False)["input_ids"]
        self.suffix_ids = tok(QWEN_SUFFIX, add_special_tokens=False)["input_ids"]
        self.room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.room < 1:
            raise PipelineError(f"rerank max_length {self.max_length} leaves no room for the pair text")
        self.yes_id = tok.convert_tokens_to_ids("yes")
        self.no_id = tok.convert_tokens_to_ids("no")
        if self.yes_id in (None, tok.unk_token_id) or self.no_id in (None, tok.unk_token_id):
            raise PipelineError(f"{self.model_name}: the tokenizer has no 'yes'/'no' tokens; not a Qwen3-Reranker")
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else tok.convert_tokens_to_ids("<|endoftext|>") or 0)

    def sequence(self, query: str, doc: str) -> list[int]:
        """The token ids scored for one pair: prefix + pair text (truncated) + suffix."""
        body = self.tokenizer(qwen_pair_text(query, doc, self.instruction), add_special_tokens=False)["input_ids"]
        return self.prefix_ids + body[: self.room] + self.suffix_ids

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        texts = [qwen_pair_text(q, d, self.instruction) for q, d in pairs]
        bodies = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [self.prefix_ids + b[: self.room] + self.suffix_ids for b in bodies]

    def _score_batch(self, batch: list[list[int]]) -> np.ndarray:
        import torch

        longest = max(len(s) for s in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):  # left padding: the last position is each sequence's own
            ids[row, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, longest - len(seq) :] = 1
        dev = torch.device(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=1).logits[:, -1, :]
            pair = torch.stack([logits[:, self.no_id], logits[:, self.yes_id]], dim=1).float()
            return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().cpu().numpy()


class CrossEncoderReranker(Reranker):
    """A sequence-classification cross-encoder (see the module docstring)."""

    kind = "cross-encoder"

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, list[int]]]:
        enc = self.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True,
                             max_length=self.max_length)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(pairs))]

    def _score_batch(self, batch: list[dict[str, list[int]]]) -> np.ndarray:
        import torch

        padded = self.tokenizer.pad(batch, return_tensors="pt")
        dev = torch.device(self.device)
        with torch.inference_mode():
            logits = self.model(**{k: v.to(dev) for k, v in padded.items()}).logits.float()
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0]).cpu().numpy()
        if logits.shape[1] == 2:
            return torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
        raise PipelineError(f"{self.model_name}: {logits.shape[1]} labels; a reranker has 1 or 2")


def load_reranker(
    model: str,
    *,
    device: str | None = None,
    max_length: int | None = None,
    batch_size: int = 16,
    instruction: str | None = None,
    compute_dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Reranker:
    """Load a reranker, choosing the scoring from the checkpoint's architecture.

    Args:
        model: local folder, ``pkg:PACKAGE/PATH`` or hub id.
        device: ``cpu``/``cuda`` (default: cuda if present).
        max_length: tokens per pair (default 8192 for Qwen3-Reranker, the model's limit for cross-encoders).
        batch_size: pairs per forward pass.
        instruction: the Qwen3-Reranker task instruction (default: the web-search one).
        compute_dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        trust_remote_code: allow the model's own code.

    Raises:
        PipelineError: the model cannot be loaded or is neither a causal LM nor a sequence classifier.

    Example:
        >>> rr = load_reranker("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
        >>> rr.score("what is a panda?", ["The giant panda is a bear.", "Paris is in France."])  # doctest: +SKIP
        array([0.98, 0.01], dtype=float32)
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    device = device or default_device()
    if compute_dtype == "auto":
        compute_dtype = "float32" if device == "cpu" else "bfloat16"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"rerank model {model!r}: cannot load ({exc})") from exc
    archs = list(getattr(config, "architectures", None) or [])
    try:
        if any(a.endswith("ForSequenceClassification") for a in archs):
            if instruction is not None:  # it would be dropped: the scores would not be the ones asked for
                raise PipelineError(f"rerank model {model!r} is a cross-encoder: it takes no task instruction "
                                    "(a rerank instruction is for Qwen3-Reranker models)")
            net = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                                     trust_remote_code=trust_remote_code)
            limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512),
                        int(getattr(config, "max_position_embeddings", 512) or 512))
            cls: type[Reranker] = CrossEncoderReranker
            kwargs: dict[str, Any] = {}
            max_length = min(max_length or limit, limit)
        elif any(a.endswith("ForCausalLM") for a in archs):
            if not str(getattr(config, "model_type", "")).startswith("qwen"):
                log.warning("%s is a %s causal LM; scoring it with the Qwen3-Reranker yes/no prompt", model,
                            getattr(config, "model_type", "?"))
            net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
            cls = QwenReranker
            kwargs = {"instruction": instruction or DEFAULT_INSTRUCTION}
            max_length = max_length or QWEN_MAX_LENGTH
        else:
            raise PipelineError(f"rerank model {model!r} ({', '.join(archs) or 'no architecture'}) is neither a "
                                "causal LM (Qwen3-Reranker) nor a sequence-classification cross-encoder")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"rerank model {model!r}: cannot load ({exc})") from exc
    net.eval().to(torch.device(device))
    own_weights(net)
    log.info("reranker %s: %s, max_length %d, %s on %s", model, cls.kind, max_length, compute_dtype, device)
    return cls(net, tokenizer, model, device, max_length, batch_size, **kwargs)
