"""Check texts: every worker embeds a few fixed texts before it writes a vector and compares them with the vectors
the output's first worker recorded for them, so that vectors of another model never join an output's.

The files digest of a local model (``model.identity``) cannot see a server whose model changed under the same
name (``--backend openai``), a torch or transformers upgrade that changes the forward, or a worker on another node
with another copy of the model while no vector exists yet. The check texts see all of these, at the cost of one
tiny batch per worker. Recorded per settings fingerprint (``OUTPUT/canary/FINGERPRINT-TEXTS.npy``, created once,
atomically: two workers starting together cannot both record) and removed with the output (``--overwrite``); it is
replaced only while the output holds no vector and no live claim, and a worker checks before each part that the
record it accepted is still the one there. An output whose vectors were made before the record existed gets it
from its next run's model once a few kept documents embed as their vectors (where none can be read back, with a
warning).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ManifestMismatch, PipelineError
from pipeline.job import versions
from pipeline.job.records import FieldSpec
from pipeline.job.sink import part_number
from pipeline.model.tokens import TextTokenizer

log = logging.getLogger(__name__)

FOLDER = "canary"
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Le chat dort sur le canapé depuis ce matin, et personne ne le dérange.",
    "def add(a, b):\n    return a + b\n",
    "北京是中华人民共和国的首都。",
)
# One model run twice agrees to ~1e-6 in float32 and to ~4e-4 between bf16 on a GPU and float32 on a CPU (the
# bench's 4B minimum over 32 documents is 0.99961); two different models, or one fine-tuned, are far below.
MIN_COSINE = 0.998
SAMPLE = 8  # kept documents compared where an output has vectors but no record yet


@dataclass(frozen=True)
class Accepted:
    """The record a worker compared itself with (or made): ``still_current`` checks it before each part."""

    path: Path
    digest: str


def canary_path(out: Path, fingerprint: str) -> Path:
    texts = hashlib.blake2b("\0".join(TEXTS).encode(), digest_size=4).hexdigest()
    return Path(out) / FOLDER / f"{fingerprint[:16]}-{texts}.npy"


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def _compare(got: np.ndarray, recorded: np.ndarray) -> tuple[bool, str]:
    """Whether ``got`` matches ``recorded`` row by row (every cosine at least ``MIN_COSINE``), and how it compares,
    for a log line or a message."""
    if recorded.shape != got.shape:
        return False, f"shape {tuple(got.shape)} against {tuple(recorded.shape)}"
    cosine = float((_unit(recorded) * _unit(got)).sum(axis=1).min())
    if cosine >= MIN_COSINE:
        return True, f"cosine {cosine:.6f} or more"
    return False, f"cosine {cosine:.4f}, at least {MIN_COSINE} expected"


def _digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _write_tmp(path: Path, vectors: np.ndarray) -> Path:
    """The vectors in a temporary file beside ``path`` (named as ``sink.remove_stale_temp_files`` knows), synced."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, vectors)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _live_claims(out: Path, lease_s: float) -> bool:
    """Whether a worker holds a claim on this output (one refreshed within the lease)."""
    now = time.time()
    for claim in (Path(out) / "shards").glob("*.claim"):
        try:
            if now - claim.stat().st_mtime < lease_s:
                return True
        except OSError:
            continue
    return False


def check_canary(out: Path, fingerprint: str, embedder, has_vectors: bool, lease_s: float,
                 spec: FieldSpec | None = None) -> Accepted:
    """Embed ``TEXTS`` and compare them with the output's record; the first worker makes the record. Where the
    output already holds vectors but no record (made before records were kept), a few kept documents whose input
    has not changed are embedded again and compared with their vectors first (``spec``: the job's fields).

    Where they differ and the output holds no vector and no live claim (a first run that stopped before its
    first part, whose model was then fixed), this worker's vectors replace the record: a worker that accepted the
    old one is refused at its next part (``still_current``).

    Raises:
        ManifestMismatch: the record differs (cosine below ``MIN_COSINE``) and the output has vectors or a live
            claim; the kept documents embed differently; or the record cannot be read.
    """
    got = np.asarray(embedder.embed_texts(list(TEXTS)), np.float32)
    path = canary_path(out, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _write_tmp(path, got)
        os.link(tmp, path)  # fails where another worker (or an earlier run) recorded first
        if has_vectors:  # vectors made before check texts were recorded: compare with some of them instead
            try:
                _check_kept(out, embedder, spec)
            except BaseException:
                path.unlink(missing_ok=True)  # not a record made by the model the output holds
                raise
        else:
            log.info("check texts recorded in %s", path)
        return Accepted(path, _digest(path))
    except FileExistsError:
        pass
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    try:
        recorded = np.load(path)
    except (OSError, ValueError) as exc:
        raise ManifestMismatch(f"{path}: the check texts' record cannot be read ({exc}); delete it to record them "
                               "anew with this model") from None
    same, what = _compare(got, recorded)
    if same:
        log.info("check texts: %s against %s", what, path)
        return Accepted(path, _digest(path))
    if not has_vectors and not _live_claims(out, lease_s):
        tmp = _write_tmp(path, got)
        os.replace(tmp, path)
        log.warning("%s: the model embeds the check texts differently from the one an earlier run of this output "
                    "started with (%s), but no vector was kept: recorded anew", out, what)
        return Accepted(path, _digest(path))
    if has_vectors:
        cause = ("the model, its server or the libraries that run it changed, or another worker of this job runs "
                 "another copy of it. Its vectors would not be comparable with the output's: restore what changed, "
                 "write to a new --output, or add --overwrite to embed everything again")
    else:
        cause = ("another worker of this job, still running, has another model (or another copy of it): give "
                 "every worker the same model")
    raise ManifestMismatch(f"{out}: the model embeds the check texts differently from the one this output was "
                           f"started with ({what}; {path}): {cause}.")


def _kept_sample(out: Path, spec: FieldSpec, n: int = SAMPLE) -> tuple[list[str], np.ndarray]:
    """Up to ``n`` documents of the live version (first chunks only) whose text can still be read from an input
    file that has not changed since: their texts and their kept vectors (float32)."""
    import pyarrow.parquet as pq

    from pipeline.job.texts import DocumentTexts

    folder = versions.live_vectors(out)
    texts: list[str] = []
    vectors: list[np.ndarray] = []
    if folder is None:
        return texts, np.zeros((0, 0), np.float32)
    paths = {part_number(p): p for p in folder.glob("part-*.parquet")
             if not p.name.endswith(".docs.parquet")}
    first = sorted(paths)[:n]  # at most n parts hold the n documents looked for (or all there are)
    lookup = DocumentTexts(out, spec, parts=set(first))
    for part in first:
        path = paths[part]
        if len(texts) >= n:
            break
        pf = pq.ParquetFile(path)
        names = ["embedding", *(["chunk"] if "chunk" in pf.schema_arrow.names else [])]
        batch = next(pf.iter_batches(batch_size=64, columns=names), None)
        if batch is None:
            continue
        rows = np.arange(batch.num_rows)
        if "chunk" in names:
            rows = rows[batch.column("chunk").to_numpy(zero_copy_only=False) == 0]
        rows = rows[:n - len(texts)]
        found = lookup.lookup([part] * len(rows), [int(r) for r in rows])
        dims = batch.schema.field("embedding").type.list_size
        matrix = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(-1, dims)
        for r, got in zip(rows, found, strict=True):
            if got is not None:
                texts.append(got[0])
                vectors.append(np.asarray(matrix[r], np.float32))
    return texts, np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)


def _check_kept(out: Path, embedder, spec: FieldSpec | None) -> None:
    texts, kept = _kept_sample(out, spec) if spec is not None else ([], None)
    if not texts:
        log.warning("%s: check texts recorded now, by this run's model: the vectors already kept (made before "
                    "embed-corpus recorded check texts) could not be compared with it (no kept document's input "
                    "is unchanged)", out)
        return
    same, what = _compare(np.asarray(embedder.embed_texts(texts), np.float32), kept)
    if not same:
        raise ManifestMismatch(
            f"{out}: the model embeds {len(texts)} documents the output kept differently from their vectors "
            f"({what}): the model, its server or the libraries that run it changed since they were made. New "
            "vectors would not be comparable with them: restore what changed, write to a new --output, or add "
            "--overwrite to embed everything again.")
    log.info("check texts recorded; %d kept documents embed as their vectors (%s)", len(texts), what)


def still_current(accepted: Accepted) -> None:
    """Refuse to write a part where the record this worker accepted was replaced since (by a worker with another
    model, while this output held no vector yet).

    Raises:
        ManifestMismatch: the record changed.
    """
    try:
        same = _digest(accepted.path) == accepted.digest
    except OSError:
        same = False
    if not same:
        raise ManifestMismatch(
            f"{accepted.path}: the check texts' record changed while this worker ran: another worker of this job "
            "has another model (or another copy of it); this worker stops without writing. Give every worker the "
            "same model.")


def check_query_side(output: Path, job: dict, embedder) -> str | None:
    """The query side of a finished job (``record.query_embedder``) embeds the check texts with the job's
    document framing and compares them with the job's record: a serving process on other library versions than
    the run (or on another copy of the model) would embed queries that do not match the vectors.

    Returns:
        How they compare (the smallest cosine), or None where the job has no record (made before check texts
        were recorded).

    Raises:
        PipelineError: below ``MIN_COSINE``.
    """
    path = canary_path(Path(output), job.get("fingerprint", ""))
    try:
        recorded = np.load(path)
    except (OSError, ValueError):
        return None
    tok, cfg = embedder.tokenizer, job.get("config", {})
    documents = copy.copy(embedder)  # the same model, framing documents as the run did (prompt, long documents)
    documents.tokenizer = TextTokenizer(tok.tokenizer, tok.fmt, prompt=job.get("model", {}).get("prompt", ""),
                                        long_docs=cfg.get("long_docs", "truncate"),
                                        chunk_tokens=cfg.get("chunk_tokens", 512),
                                        chunk_overlap=cfg.get("chunk_overlap", 0))
    got = np.asarray(documents.embed_texts(list(TEXTS)), np.float32)
    same, what = _compare(got, recorded)
    if not same:
        made = job.get("versions", {})
        raise PipelineError(
            f"{output}: this process embeds the check texts differently from the run that made the vectors ({what}; "
            f"{path}): queries embedded here would not match them. The run used "
            + ", ".join(f"{k} {v}" for k, v in made.items())
            + "; run search/serve with the same versions and model, or run the job again with --overwrite")
    return what
