"""The job record (``OUTPUT/job.json``): how a job's vectors were made, so that queries are embedded the same way.

A run writes it once its model has loaded (settings, the resolved framing: pooling, prefix/suffix tokens, max
length, prompts, dims; versions). ``search``, ``eval`` and ``serve`` read it to build the query side.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.errors import ManifestMismatch, PipelineError
from pipeline.job.canary import check_query_side
from pipeline.job.config import JobConfig
from pipeline.model.encoder import Embedder
from pipeline.model.identity import changed_files, model_files
from pipeline.util import file_key, write_json_atomic

JOB_RECORD = "job.json"
log = logging.getLogger(__name__)


def write_job_record(out: Path, cfg: JobConfig, embedder: Embedder, files: dict[str, str] | None = None) -> None:
    """``OUTPUT/job.json``: the settings, the resolved model framing and the model's files
    (``identity.model_files``), to embed queries the same way."""
    import torch
    import transformers

    from pipeline import __version__

    write_json_atomic(out / JOB_RECORD, {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "model": embedder.info.to_dict(),
        "model_files": files,
        "versions": {"embed-corpus": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "updated_at": time.time(),
    })


def check_model_files(out: Path, model: str, files: dict[str, str] | None, has_vectors: bool) -> None:
    """Refuse to add vectors of a model whose files differ from those the output's vectors were made with.

    Raises:
        ManifestMismatch: ``job.json`` recorded other files for the model and ``out`` has vectors.
    """
    path = Path(out) / JOB_RECORD
    if files is None or not has_vectors or not path.exists():
        return
    changed = _changed(json.loads(path.read_text()).get("model_files"), files)
    if changed:
        raise ManifestMismatch(
            f"{out}: the files of model {model!r} changed since its vectors were made ({changed}): new "
            "vectors would not be comparable with the ones kept. Restore the model, write to a new --output, or "
            "add --overwrite to embed everything again with this model."
        )


# What a model's framing resolves to (from the settings, the model's files and this code): kept vectors were made so
FRAMING = ("pooling", "max_length", "prefix", "suffix", "prompt", "dims", "normalize", "width", "head",
           "include_prompt", "lowercase")


def check_framing(out: Path, info: Any, has_vectors: bool) -> None:
    """Refuse to add vectors framed otherwise than the kept ones: the same settings and model files resolve to
    another max length, prompt, special tokens, pooling or head under another version of embed-corpus (say, one
    that honours ``--max-length`` above the model's sentence-transformers default, where an older one cut it).

    Raises:
        ManifestMismatch: ``job.json`` recorded another framing and ``out`` has vectors.
    """
    path = Path(out) / JOB_RECORD
    if not has_vectors or not path.exists():
        return
    recorded, now = json.loads(path.read_text()).get("model") or {}, info.to_dict()
    differ = [f"{k} {recorded[k]!r} -> {now[k]!r}" for k in FRAMING if k in recorded and k in now
              and recorded[k] != now[k]]
    if differ:
        why = (" (embed-corpus before 2026-12-01 cut a --max-length above the model's sentence-transformers "
               "max_seq_length down to it; now it is honoured)" if "max_length" in recorded and "max_length" in now
               and recorded["max_length"] != now["max_length"] else "")
        raise ManifestMismatch(
            f"{out}: the same settings now frame texts otherwise than when its vectors were made ({'; '.join(differ)})"
            f"{why}: new vectors would not be comparable with the ones kept. Write to a new --output, or add "
            "--overwrite to embed everything again."
        )


def _changed(recorded: dict[str, str] | None, now: dict[str, str] | None) -> str:
    """The model files that differ between a job's record and now, named for a message ("" if none, or if
    either side is unknown: an output made before files were recorded, a model without a folder here)."""
    changed = changed_files(recorded, now) if recorded and now is not None else []
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


# Settings that change no stored vector, only how queries are embedded: not in the fingerprint, so a rerun that
# changes one is not refused; it is recorded at once (``record_query_side``), whether or not the run embeds.
QUERY_SIDE = ("query_instruction",)


def record_query_side(out: Path, cfg: JobConfig) -> None:
    """Write this run's query-side settings into ``job.json`` when they differ from what it says: a rerun with
    nothing new to embed never rewrote it, so its ``--query-instruction`` was dropped and search kept the old one,
    exit 0."""
    path = Path(out) / JOB_RECORD
    if not path.exists():
        return
    record = json.loads(path.read_text())
    config, now = record.get("config") or {}, cfg.to_dict()
    changed = {k: now.get(k) for k in QUERY_SIDE if config.get(k) != now.get(k)}
    if changed:
        log.warning("%s: query side changed (%s): search and serve embed queries so from now on", out,
                    ", ".join(f"{k} {config.get(k)!r} -> {v!r}" for k, v in changed.items()))
        write_json_atomic(path, {**record, "config": {**config, **changed}, "updated_at": time.time()})


def query_side_of(record: dict[str, Any]) -> dict[str, Any]:
    """What of a job record decides how queries are embedded: settings, model, its files and framing."""
    config, model = record.get("config") or {}, record.get("model") or {}
    # the framing, not all of the model record: a run on another device (bf16 on a GPU, float32 on a CPU)
    # records another compute dtype for the same queries
    return {"fingerprint": record.get("fingerprint"), "model": {k: model.get(k) for k in ("model", *FRAMING)},
            "model_files": record.get("model_files"), **{k: config.get(k) for k in QUERY_SIDE}}


class JobWatch:
    """Whether ``OUTPUT/job.json`` still says how to embed queries what it said when a searcher or a server loaded
    its query embedder (a stat per call; the file is read again only when it changed). A rerun with another model
    (``--overwrite``), other model files or another query instruction: the loaded embedder no longer embeds queries
    as a fresh search does, and answering with it would give other results, without an error."""

    def __init__(self, out: str | Path, record: dict[str, Any]) -> None:
        self.path = Path(out) / JOB_RECORD
        self.side = query_side_of(record)
        self.key = file_key(self.path)
        self.differ: str | None = None

    def changed(self) -> str | None:
        """What changed (``None``: nothing that matters); once changed, it stays so."""
        key = file_key(self.path)
        if self.differ is None and key != self.key:
            try:
                now = query_side_of(json.loads(self.path.read_text()))
            except (OSError, ValueError):  # gone (--overwrite under way) or being replaced: look again next time
                return None
            self.key = key
            differ = [k for k in self.side if self.side[k] != now.get(k)]
            self.differ = ", ".join(differ) or None
        return self.differ

    def message(self) -> str:
        return (f"{self.path} changed since this process loaded its query embedder ({self.differ}): its queries "
                "would not be embedded as a fresh search embeds them; start it again")


def read_job_record(output: str | Path) -> dict[str, Any]:
    """``OUTPUT/job.json`` as written by a run (config, resolved model framing, versions).

    Raises:
        PipelineError: there is none (no run has loaded a model for this output yet).
    """
    path = Path(output) / JOB_RECORD
    if not path.exists():
        raise PipelineError(f"{path} does not exist: run `embed-corpus run` for this output first")
    return json.loads(path.read_text())


def query_embedder(output: str | Path, *, device: str | None = None, batch_tokens: int = 16384,
                   trust_remote_code: bool = False) -> Embedder:
    """The embedder for search queries of a job: same model, pooling, max length, dims and normalisation as its
    documents, with the query instruction (``query_instruction``, else the model's ``query`` prompt, else none).

    Args:
        trust_remote_code: whether the caller allows the model folder's own Python code (a flag the user gave).
            A job made with ``trust_remote_code`` is refused unless it is True: ``job.json`` alone, which anyone
            who can write the output folder can edit, must not switch it on.

    Raises:
        PipelineError: ``output`` has no ``job.json`` (no run has loaded a model there yet), or its job needs
            the model's own code and ``trust_remote_code`` is False.
    """
    job = read_job_record(output)
    cfg, model = job["config"], job["model"]
    wanted = bool(cfg.get("trust_remote_code", False))
    if wanted and trust_remote_code is False:
        raise PipelineError(
            f"{Path(output) / JOB_RECORD} says its model {cfg.get('model')!r} runs its own Python code "
            "(trust_remote_code): add --trust-remote-code (search, eval, serve) if you trust that model folder"
        )
    instruction = cfg.get("query_instruction")
    prompt_name = "query" if instruction is None and "query" in model.get("prompts", {}) else None
    embedder = Embedder.load(
        cfg["model"], device=device, compute_dtype=cfg.get("compute_dtype", "auto"), pooling=model["pooling"],
        max_length=model["max_length"], dims=cfg.get("dims"), normalize=cfg.get("normalize", True),
        instruction=instruction, prompt_name=prompt_name, batch_tokens=batch_tokens, compile=False,
        trust_remote_code=wanted,
    )
    changed = _changed(job.get("model_files"), model_files(cfg["model"]))
    if changed:
        raise PipelineError(
            f"the files of model {cfg['model']!r} changed since the vectors of {output} were made ({changed}): "
            "queries embedded with it would not match them. Restore the model, or run the job again with --overwrite"
        )
    check_query_side(Path(output), job, embedder)  # and what file digests cannot see (the libraries, say)
    return embedder
