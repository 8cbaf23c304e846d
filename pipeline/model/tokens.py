"""Tokenization: texts -> exactly the token ids the model's authors intend, flat in NumPy arrays.

Every sequence is ``prefix + content + suffix``, where prefix/suffix are the model's special tokens (BERT:
``[CLS]`` / ``[SEP]``). For Qwen3-Embedding the suffix is exactly one ``<|endoftext|>`` (151643) whether
or not the tokenizer appends it itself (older tokenizer files do not), and content is cut to
``max_length - 1`` tokens before it is appended. The prompt (``Instruct: ...\\nQuery:``) is part of the text.

Over-long documents are truncated, or with ``long_docs="chunk"`` cut into windows of ``chunk_tokens``
content tokens overlapping by ``chunk_overlap``; each window is one output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHARS_PER_TOKEN_BOUND = 12  # a text cut at this many characters per wanted token still yields enough tokens
# Texts per tokenizer call. A shard is tokenized in the prefetch thread while the main thread launches the GPU's
# kernels; one call over a whole shard held the interpreter lock for 75-118 ms at a time (4,000 texts, CPU
# machine), calls of 256 for 17-20 ms, so the launching thread waits less for it: the 0.6B command ran 4% faster
# on an H200 (data/benchmarks/h200-ab-command-2026-12-01.txt). Same ids either way.
TOKENIZE_CALL = 256


@dataclass(frozen=True)
class SequenceFormat:
    """How token ids are framed for a model (found by ``encoder.inspect_model``)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_length: int
    strip_suffix: bool = False  # drop copies of the suffix token at the end of content (Qwen3's EOS)

    @property
    def max_content(self) -> int:
        return self.max_length - len(self.prefix) - len(self.suffix)


@dataclass
class Encoded:
    """Token ids of many sequences, flat.

    Attributes:
        ids: int32 (total,), all sequences concatenated.
        offsets: int64 (n + 1,), sequence i is ``ids[offsets[i]:offsets[i + 1]]``.
        doc: int64 (n,), the input text each sequence came from.
        chunk: int32 (n,), chunk number within its text (0 when not chunked).
        span: int32 (n, 2), content token span ``[start, end)`` of the sequence within its text.
        truncated: bool (n,), the text had more content tokens than were embedded.
    """

    ids: np.ndarray
    offsets: np.ndarray
    doc: np.ndarray
    chunk: np.ndarray
    span: np.ndarray
    truncated: np.ndarray
    texts: list[str] | None = None  # the framed text of each sequence, for backends that send text

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def __len__(self) -> int:
        return len(self.doc)

    def sequence(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, idx: np.ndarray) -> Encoded:
        """The sequences ``idx``, in that order, as sequences ``0..len(idx)-1`` of their own (``doc`` renumbered
        likewise; texts dropped)."""
        idx = np.asarray(idx, dtype=np.int64)
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(self.lengths[idx], out=offsets[1:])
        ids = np.concatenate([self.sequence(int(i)) for i in idx]) if len(idx) else self.ids[:0]
        return Encoded(ids, offsets, np.arange(len(idx), dtype=np.int64), self.chunk[idx], self.span[idx],
                       self.truncated[idx])


class TextTokenizer:
    """Wraps a Hugging Face tokenizer with the framing of one model.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        fmt: the sequence format of the model.
        prompt: text prepended to every input (a query instruction or a named prompt).
        long_docs: ``"truncate"`` or ``"chunk"``.
        chunk_tokens: content tokens per chunk.
        chunk_overlap: tokens shared by consecutive chunks.
    """

    def __init__(
        self,
        tokenizer,
        fmt: SequenceFormat,
        *,
        prompt: str = "",
        long_docs: str = "truncate",
        chunk_tokens: int = 512,
        chunk_overlap: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.prompt = prompt
        self.long_docs = long_docs
        self.prompt_ids = self._content_ids([prompt])[0] if prompt else []
        room = fmt.max_content - len(self.prompt_ids)
        if room < 1:
            raise ValueError(
                f"the prompt takes {len(self.prompt_ids)} tokens; max_length {fmt.max_length} leaves no room"
            )
        self.chunk_tokens = min(chunk_tokens, room)
        self.chunk_step = max(1, self.chunk_tokens - chunk_overlap)

    def _content_ids(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []  # none for no texts (a shard whose rows were all rejected)
        for start in range(0, len(texts), TOKENIZE_CALL):
            out += self.tokenizer(texts[start : start + TOKENIZE_CALL], add_special_tokens=False,
                                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        if self.fmt.strip_suffix and self.fmt.suffix:
            end = self.fmt.suffix[-1]
            for ids in out:
                while ids and ids[-1] == end:
                    ids.pop()
        return out

    @staticmethod
    def _cut(text: str, cap: int) -> str:
        """``text`` cut at most ``cap`` characters in, at the end of a word: before a space or tab that follows a
        character other than whitespace; the whole text where there is no such place.

        Tokenizers split text into pre-tokens (words, digit runs, punctuation runs) and tokenize each alone, so
        the tokens of such a prefix are the first tokens of the whole text. Cut anywhere else, the last word's
        tokens change, and not only at the end (BPE merges over the whole word; WordPiece makes one ``[UNK]``
        of a word over 100 characters but word pieces of its first 90), nor is a cut before a line break safe
        (Qwen's pre-tokenizer joins punctuation with the line breaks after it)."""
        if len(text) <= cap:
            return text
        p = cap
        while p > 0:
            p = max(text.rfind(" ", 0, p + 1), text.rfind("\t", 0, p + 1))
            if p <= 0:
                break
            if not text[p - 1].isspace():
                return text[:p]
            p -= 1
        return text

    def _content_ids_capped(self, texts: list[str], limit: int) -> list[list[int]]:
        """Content ids, tokenizing only a prefix of very long texts when that gives the same first ``limit``
        tokens: a prefix that ends at the end of a word (``_cut``) and still has more than ``limit`` tokens (so the
        text is truncated)."""
        cut = [self._cut(t, limit * CHARS_PER_TOKEN_BOUND) for t in texts]
        ids = self._content_ids(cut)
        redo = [i for i, (t, c, x) in enumerate(zip(texts, cut, ids, strict=True))
                if len(c) < len(t) and len(x) <= limit]
        if redo:
            full = self._content_ids([texts[i] for i in redo])
            for i, x in zip(redo, full, strict=True):
                ids[i] = x
        return ids

    def encode(self, texts: list[str]) -> Encoded:
        """Tokenize texts into framed sequences (one per text, or several per long text when chunking)."""
        fmt = self.fmt
        prefix, suffix = list(fmt.prefix), list(fmt.suffix)
        limit = fmt.max_content
        with_prompt = [self.prompt + t for t in texts] if self.prompt else texts
        if self.long_docs == "truncate":
            contents = self._content_ids_capped(with_prompt, limit)
        else:
            contents = self._content_ids(with_prompt)
        bodies: list[list[int]] = []
        if self.long_docs == "chunk" and self.prompt:
            # a chunk's body is its text's own tokens: in tokenize(prompt + text) the prompt's last token can join
            # the text's first (Qwen: "Query:" + "The" -> ":The"), so cutting the prompt's length off would cut it;
            # a short document's token span is its text's own tokens too, not the prompt's with them
            bodies = self._content_ids(texts)
        seqs: list[list[int]] = []
        doc, chunk, span, truncated = [], [], [], []
        for d, content in enumerate(contents):
            if len(content) <= limit or self.long_docs == "truncate":
                seqs.append(prefix + content[:limit] + suffix)
                doc.append(d)
                chunk.append(0)
                span.append((0, len(bodies[d]) if bodies else min(len(content), limit)))
                truncated.append(len(content) > limit)
                continue
            body = bodies[d] if self.prompt else content
            starts = range(0, max(1, len(body) - self.chunk_tokens + self.chunk_step), self.chunk_step)
            for c, start in enumerate(starts):
                end = min(start + self.chunk_tokens, len(body))
                seqs.append(prefix + self.prompt_ids + body[start:end] + suffix)
                doc.append(d)
                chunk.append(c)
                span.append((start, end))
                truncated.append(False)
                if end == len(body):
                    break
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return Encoded(
            flat,
            offsets,
            np.asarray(doc, dtype=np.int64),
            np.asarray(chunk, dtype=np.int32),
            np.asarray(span, dtype=np.int32).reshape(-1, 2),
            np.asarray(truncated, dtype=bool),
        )
