"""The real Qwen2/Qwen3 tokenizer, offline: converted from ``qwen.tiktoken`` (shipped by the PyPI package
``dashscope``, 151,643 ranks) into a byte-level BPE ``vocab.json`` + ``merges.txt``, plus the Qwen3 special tokens
with their exact ids (151643..151668).

Two tokenizer flavours exist in the wild (QwenLM/Qwen3-Embedding#54): recent tokenizer files append
``<|endoftext|>`` (151643) to every encoded text through the post-processor, older ones append nothing.
``append_eos`` selects which one is built, so that a pipeline can be tested against both.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 151643
IM_END = "<|im_end|>"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_BPE_RANKS = 151643

# The Qwen3 added-token table, ids 151643..151668 in this order. The flag says whether the published
# tokenizer marks the token as special (skipped by ``decode(skip_special_tokens=True)``); all are matched
# as whole tokens when they occur in a text.
QWEN3_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_SPECIAL_TOKEN_IDS: dict[str, int] = {tok: ENDOFTEXT_ID + i for i, (tok, _) in enumerate(QWEN3_SPECIAL_TOKENS)}




def find_qwen_tiktoken() -> Path:
    """Locate ``qwen.tiktoken`` inside the installed ``dashscope`` package, without importing it.

    ``dashscope`` is only needed for this resource file; importing it would pull in its network client
    dependencies, so the package is found through its import spec only.

    Returns:
        The path of ``dashscope/resources/qwen.tiktoken``.

    Raises:
        FileNotFoundError: ``dashscope`` is not installed, or ships no ``qwen.tiktoken``.
    """
    spec = importlib.util.find_spec("dashscope")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "resources" / "qwen.tiktoken"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "qwen.tiktoken not found: the Qwen BPE vocabulary comes from the PyPI package 'dashscope' "
        "(pip install dashscope), file dashscope/resources/qwen.tiktoken"
        + (f"; searched {', '.join(locations)}" if locations else "; the package is not installed")
    )


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level mapping: each of the 256 byte values to a printable unicode character.

    Returns:
        A dict from byte value to a one-character string.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def _read_tiktoken(path: Path) -> list[bytes]:
    """Read a tiktoken rank file (``base64 rank`` per line) into a list indexed by rank."""
    by_rank: dict[int, bytes] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                by_rank[int(rank)] = base64.b64decode(token_b64)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank line: {line[:80]!r}") from exc
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"{path}: ranks are not contiguous from 0")
    return [by_rank[r] for r in range(len(by_rank))]


def _split_in_two(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Split a token into the two parts whose merge creates it, by replaying BPE with the lower ranks only."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"rank {rank} ({token!r}) does not split into two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=4)
def _convert_tiktoken(path: str, mtime_ns: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Convert a tiktoken rank file to a byte-level BPE vocab and merges (cached per file and mtime)."""
    del mtime_ns  # part of the cache key only
    tokens = _read_tiktoken(Path(path))
    ranks = {tok: r for r, tok in enumerate(tokens)}
    if len(ranks) != len(tokens):
        raise ValueError(f"{path}: duplicate tokens")
    b2u = bytes_to_unicode()

    def to_str(tok: bytes) -> str:
        return "".join(b2u[b] for b in tok)

    vocab = {to_str(tok): r for r, tok in enumerate(tokens)}
    merges = []
    for r, tok in enumerate(tokens):
        if len(tok) > 1:
            left, right = _split_in_two(tok, r, ranks)
            merges.append((to_str(left), to_str(right)))
    return vocab, tuple(merges)


def convert_qwen_tiktoken(
    tiktoken_path: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert ``qwen.tiktoken`` into a byte-level BPE vocabulary and merge list.

    Every multi-byte rank is the merge of exactly two lower-ranked tokens; the merges are listed in rank
    order, which makes BPE with them equal to tiktoken's lowest-rank-first merging.

    Args:
        tiktoken_path: The rank file; default: the one shipped by ``dashscope``.

    Returns:
        ``(vocab, merges)``: token string (GPT-2 byte-level alphabet) -> id, and the merges in order.
    """
    path = Path(tiktoken_path) if tiktoken_path is not None else find_qwen_tiktoken()
    vocab, merges = _convert_tiktoken(str(path.resolve()), path.stat().st_mtime_ns)
    return dict(vocab), list(merges)


def _added_token(content: str, special: bool) -> Any:
    from tokenizers import AddedToken

    return AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _post_processor(append_eos: bool) -> Any:
    from tokenizers import processors

    if append_eos:
        # As the recent Qwen3-Embedding tokenizer.json: every encoded text ends with <|endoftext|>.
        return processors.TemplateProcessing(
            single=f"$A:0 {ENDOFTEXT}:0",
            pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
            special_tokens=[(ENDOFTEXT, ENDOFTEXT_ID)],
        )
    # As the original Qwen2/Qwen3 tokenizer.json: nothing is added.
    return processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def _write_bpe_files(out_dir: Path, vocab: dict[str, int], merges: Iterable[tuple[str, str]]) -> None:
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        for left, right in merges:
            fh.write(f"{left} {right}\n")


def build_qwen_tokenizer(
    out_dir: str | os.PathLike[str],
    *,
    append_eos: bool = True,
    tiktoken_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Build the Qwen3 tokenizer offline and save it with ``save_pretrained``.

    The saved directory loads with ``AutoTokenizer.from_pretrained(out_dir)`` into a ``Qwen2Tokenizer``
    (transformers 5; ``Qwen2TokenizerFast`` is the same class there) that behaves as built here: the
    Qwen3 special tokens at ids 151643..151668, pad ``<|endoftext|>``, eos ``<|im_end|>``, left padding,
    ``model_max_length`` 32768, and ``<|endoftext|>`` appended to every encoded text iff ``append_eos``.

    Args:
        out_dir: Directory to write (created if missing).
        append_eos: Whether the tokenizer's post-processor appends ``<|endoftext|>`` (recent tokenizer
            files) or nothing (older files).
        tiktoken_path: The ``qwen.tiktoken`` rank file; default: the one shipped by ``dashscope``.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileNotFoundError: No ``qwen.tiktoken`` (install the PyPI package ``dashscope``).
        RuntimeError: The built tokenizer does not have the expected ids (a conversion bug).
    """
    from transformers import Qwen2TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = convert_qwen_tiktoken(tiktoken_path)
    if len(vocab) != QWEN_BPE_RANKS:
        raise RuntimeError(f"expected {QWEN_BPE_RANKS} BPE ranks, got {len(vocab)}")

    # transformers 5: Qwen2TokenizerFast(vocab_file=..., merges_file=...) silently builds an EMPTY vocabulary
    # (the files are only read by from_pretrained), so the converted vocab and merges are passed in directly.
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens([_added_token(t, special) for t, special in QWEN3_SPECIAL_TOKENS])
    # The named extra special tokens, as the published tokenizer_config.json lists them.
    named = [t for t, special in QWEN3_SPECIAL_TOKENS[1:] if special]
    tok.add_special_tokens({"extra_special_tokens": named})
    tok.eos_token = IM_END
    tok.pad_token = ENDOFTEXT
    tok.padding_side = "left"
    tok.model_max_length = 32768
    tok.backend_tokenizer.post_processor = _post_processor(append_eos)

    _check_tokenizer(tok, append_eos)
    tok.save_pretrained(str(out))
    _write_bpe_files(out, vocab, merges)
    _set_tokenizer_config(out)

    from transformers import AutoTokenizer

    _check_tokenizer(AutoTokenizer.from_pretrained(str(out)), append_eos)
    return out


def _set_tokenizer_config(out: Path) -> None:
    """Pin the settings that must survive a reload in ``tokenizer_config.json``.

    ``add_bos_token``/``add_eos_token`` must NOT be written: when present, transformers 5 rebuilds the
    post-processor from them on load (appending ``eos_token`` = ``<|im_end|>``), dropping the one saved in
    ``tokenizer.json``.
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("add_bos_token", None)
    config.pop("add_eos_token", None)
    config.update(
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "model_max_length": 32768,
            "padding_side": "left",
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "bos_token": None,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
        }
    )
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_tokenizer(tok: Any, append_eos: bool) -> None:
    """Raise RuntimeError unless ``tok`` has the Qwen3 ids and the requested EOS behaviour."""
    problems = []
    for token, want in QWEN3_SPECIAL_TOKEN_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            problems.append(f"{token} -> {got}, want {want}")
    if len(tok) != ENDOFTEXT_ID + len(QWEN3_SPECIAL_TOKENS):
        problems.append(f"len(tokenizer) = {len(tok)}, want {ENDOFTEXT_ID + len(QWEN3_SPECIAL_TOKENS)}")
    tail = [ENDOFTEXT_ID] if append_eos else []
    for text, ids in (("Hello world", [9707, 1879]), ("yes", [9693]), ("no", [2152])):
        got = tok(text).input_ids
        if got != ids + tail:
            problems.append(f"{text!r} -> {got}, want {ids + tail}")
        got = tok(text, add_special_tokens=False).input_ids
        if got != ids:
            problems.append(f"{text!r} (no special tokens) -> {got}, want {ids}")
    if (tok.pad_token_id, tok.eos_token_id, tok.padding_side) != (ENDOFTEXT_ID, 151645, "left"):
        problems.append(f"pad/eos/padding_side = {tok.pad_token_id}/{tok.eos_token_id}/{tok.padding_side}")
    if problems:
        raise RuntimeError("the built Qwen tokenizer is wrong: " + "; ".join(problems))


def tokenizer_appends_eos(tokenizer_dir: str | os.PathLike[str]) -> bool:
    """Whether the tokenizer saved in ``tokenizer_dir`` appends ``<|endoftext|>`` to an encoded text.

    Args:
        tokenizer_dir: A directory that ``AutoTokenizer.from_pretrained`` loads.

    Returns:
        True when ``tokenizer("Hello world").input_ids`` ends with 151643.
    """
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))("Hello world").input_ids
    return bool(ids) and ids[-1] == ENDOFTEXT_ID


def install_tokenizer(out: Path, tokenizer_dir: str | os.PathLike[str] | None, append_eos: bool) -> None:
    if tokenizer_dir is None:
        build_qwen_tokenizer(out, append_eos=append_eos)
        return
    src = Path(tokenizer_dir)
    if tokenizer_appends_eos(src) != append_eos:
        verb = "does not append" if append_eos else "appends"
        raise ValueError(f"the tokenizer in {src} {verb} <|endoftext|>, append_eos={append_eos} asks otherwise")
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (e.g. to check ``qwen.tiktoken`` against ``QWEN_TIKTOKEN_SHA256``).

    Args:
        path: The file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
