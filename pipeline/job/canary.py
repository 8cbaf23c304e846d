"""Check texts: every worker embeds a few fixed texts before it writes a vector and compares them with the vectors
the output's first worker recorded for them, so that vectors of another model never join an output's.

The files digest of a local model (``model.identity``) cannot see a server whose model changed under the same
name (``--backend openai``), a torch or transformers upgrade that changes the forward, or a worker on another node
with another copy of the model while no vector exists yet. The check texts see all of these, at the cost of one
tiny batch per worker. Recorded per settings fingerprint (``OUTPUT/canary/FINGERPRINT-TEXTS.npy``, created once,
atomically: two workers starting together cannot both record) and removed only with the output (``--overwrite``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from pathlib import Path

import numpy as np

from pipeline.errors import ManifestMismatch

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


def canary_path(out: Path, fingerprint: str) -> Path:
    texts = hashlib.blake2b("\0".join(TEXTS).encode(), digest_size=4).hexdigest()
    return Path(out) / FOLDER / f"{fingerprint[:16]}-{texts}.npy"


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def check_canary(out: Path, fingerprint: str, embedder, has_vectors: bool) -> float | None:
    """Embed ``TEXTS`` and compare them with the output's record, or record them (the first worker).

    Returns:
        The smallest cosine against the record, or None where this worker made the record.

    Raises:
        ManifestMismatch: the record exists and a text's cosine is below ``MIN_COSINE``.
    """
    got = np.asarray(embedder.embed_texts(list(TEXTS)), np.float32)
    path = canary_path(out, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name no other worker (another host, the same pid) can write too: the record is linked from it
    tmp = path.with_name(f".{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}.npy")
    np.save(tmp, got)
    try:
        os.link(tmp, path)  # fails where another worker (or an earlier run) recorded first
        log.info("check texts recorded in %s", path)
        return None
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    recorded = np.load(path)
    if recorded.shape != got.shape:
        cosine = -1.0
    else:
        cosine = float((_unit(recorded) * _unit(got)).sum(axis=1).min())
    if cosine < MIN_COSINE:
        what = (f"shape {tuple(got.shape)} against {tuple(recorded.shape)}" if cosine == -1.0
                else f"cosine {cosine:.4f}, at least {MIN_COSINE} expected")
        advice = ("restore them, write to a new --output, or add --overwrite to embed everything again"
                  if has_vectors else "no vector was kept yet: add --overwrite to start over with this model")
        raise ManifestMismatch(
            f"{out}: the model embeds the check texts differently from the one this output was started with "
            f"({what}; {path}): the model, its server or the libraries that run it changed, or another worker "
            f"of this job runs another copy of it. Its vectors would not be comparable with the output's: "
            f"{advice}.")
    log.info("check texts: cosine %.6f or more against %s", cosine, path)
    return cosine
