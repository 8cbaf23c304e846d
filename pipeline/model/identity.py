"""What a model's files are, so that a job can tell when the model behind a name has changed.

A job's settings name its model (a folder, ``pkg:...``, a hub id), not its weights: a folder updated in place
(``/models/current``), a hub id that moved to a new revision, or a package upgrade would otherwise give the
edited documents of a nightly run another model's vectors than the documents kept from before, in one output.
``model_files`` digests the files its loading reads (configs, tokenizer and weights); the job records them and
compares them on every run and on the query side.

Cost: files up to ``FULL_BYTES`` are hashed whole; larger ones (weights) by their size, their first and last
``EDGE_BYTES`` (a safetensors header names and places every tensor) and ``SAMPLES`` blocks spread evenly
between, about 16 MB per file, a few hundred milliseconds for an 8 GB model instead of several seconds for a full
hash on every start. A checkpoint trained further changes its tensors throughout; any change that spans at least
1/``SAMPLES`` of a file (36 MB of an 8 GB one) is always seen; an edit of one small tensor alone may not be.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FULL_BYTES = 64 << 20
EDGE_BYTES = 1 << 20
SAMPLES = 224
SAMPLE_BYTES = 64 << 10
LOADED_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".py")  # configs, vocabularies, code


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
    """``{relative path: digest}`` of the files a model's loading reads (``loaded_files``), or None where the
    model has no folder here."""
    folder = model_folder(model)
    if folder is None:
        return None
    return {name: file_digest(folder / name) for name in loaded_files(folder)}


def _weights(names: list[str]) -> list[str]:
    """The weight files among ``names``: the ``*.safetensors``, else the ``*.bin`` (transformers prefers the first)."""
    return [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]


def loaded_files(folder: Path) -> list[str]:
    """The files of a model folder that its loading reads: the top level's configs, tokenizer files, code and
    weights (``*.bin`` only where there is no ``*.safetensors``, which transformers prefers), and the config and
    weights of each sentence-transformers module. Not its other folders (``onnx/``, ``checkpoint-*/``: another tool's
    files, added or removed without changing this model), and no links followed into other folders."""
    top = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    names = [n for n in top if n.endswith(LOADED_SUFFIXES)] + _weights(top)
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
        except ValueError:
            entries = []
        for entry in entries if isinstance(entries, list) else []:
            sub = str(entry.get("path") or "") if isinstance(entry, dict) else ""
            if sub and (folder / sub / "config.json").is_file():
                names.append(f"{sub}/config.json")
                inner = sorted(p.name for p in (folder / sub).iterdir() if p.is_file())  # a Dense module's weights
                names += [f"{sub}/{n}" for n in _weights(inner)]
    return sorted(set(names))


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


def own_weights(net) -> None:
    """Give the CPU weights of a loaded model memory of their own, off its checkpoint file.

    transformers memory-maps a safetensors checkpoint and keeps a CPU tensor of its stored dtype as a view of
    the map: a new revision copied over the same file (``cp``) then changed the weights of a running server or
    CPU job under it, after ``model_files`` was checked, and its vectors with them. Costs one copy of the CPU
    weights at load (GPU weights are copies already).
    """
    import itertools

    import torch

    with torch.no_grad():
        for t in itertools.chain(net.parameters(), net.buffers()):
            if t.device.type == "cpu":
                t.data = t.data.clone()
