"""What a model's files are, so that a job can tell when the model behind a name has changed.

A job's settings name its model (a folder, ``pkg:...``, a hub id), not its weights: a folder updated in place
(``/models/current``), a hub id that moved to a new revision, or a package upgrade would otherwise give the
edited documents of a nightly run another model's vectors than the documents kept from before, in one output.
``model_files`` digests every file of the model's folder (configs, tokenizer and weights); the job records it
and compares it on every run and on the query side.

Cost: files up to ``FULL_BYTES`` are hashed whole; larger ones (weights) by their size, their first and last
``EDGE_BYTES`` (a safetensors header names and places every tensor) and ``SAMPLES`` blocks spread evenly
between, about 16 MB per file, a few hundred milliseconds for an 8 GB model instead of several seconds for a full
hash on every start. A checkpoint trained further changes its tensors throughout; any change that spans at least
1/``SAMPLES`` of a file (36 MB of an 8 GB one) is always seen; an edit of one small tensor alone may not be.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_BYTES = 64 << 20
EDGE_BYTES = 1 << 20
SAMPLES = 224
SAMPLE_BYTES = 64 << 10
SKIPPED_SUFFIXES = (".md", ".lock")  # documentation, download locks


def model_folder(model: str) -> Path | None:
    """The folder a model name loads from: a local folder, a ``pkg:`` folder, or a hub id's cached snapshot
    (None where there is none: a hub id not downloaded, a stand-in model of the benchmarks)."""
    from pipeline.errors import PipelineError
    from pipeline.model.encoder import resolve_model_path

    try:
        path = Path(resolve_model_path(model))
    except PipelineError:
        return None
    if path.is_dir():
        return path
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: nothing to compare
        return None


def model_files(model: str) -> dict[str, str] | None:
    """``{relative path: digest}`` of the files of ``model``'s folder (hidden files and documentation left out),
    or None where the model has no folder here."""
    folder = model_folder(model)
    if folder is None:
        return None
    out = {}
    for root, dirs, names in os.walk(folder, followlinks=True):  # linked folders too (a copy made of links)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES) or not path.is_file():
                continue
            out[path.relative_to(folder).as_posix()] = file_digest(path)
    return dict(sorted(out.items()))


def file_digest(path: Path) -> str:
    """Digest of a file: whole up to ``FULL_BYTES``, else its size, edges and evenly spread samples."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_BYTES:
            while block := f.read(1 << 20):
                h.update(block)
            return h.hexdigest()
        h.update(f.read(EDGE_BYTES))
        step = (size - 2 * EDGE_BYTES - SAMPLE_BYTES) // SAMPLES
        for i in range(SAMPLES):
            f.seek(EDGE_BYTES + i * step)
            h.update(f.read(SAMPLE_BYTES))
        f.seek(size - EDGE_BYTES)
        h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def changed_files(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Names of the files added, removed or changed between two ``model_files`` results."""
    return sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))
