"""Job configuration: one frozen dataclass, loaded from YAML job files and overridden by CLI flags.

The CLI options of ``embed-corpus run`` are generated from the fields below (``pipeline/cli/common.py``), so a
job file key, a flag and a field can never drift apart. Every value is validated in ``__post_init__``; an invalid one
raises ``ConfigError`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import yaml

if TYPE_CHECKING:
    from pipeline.model.encoder import ModelOptions

LongDocs = Literal["truncate", "chunk"]
OnBadRecord = Literal["error", "skip"]
OutputDtype = Literal["float32", "float16"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
PromptName = Literal["query", "document"]
Pooling = Literal["auto", "lasttoken", "mean", "cls"]
Attention = Literal["auto", "padded", "packed"]
Backend = Literal["local", "openai"]


INDEX_OPTIONS = {"factory", "max_memory", "metric", "target_recall", "recall_k", "lists", "gpu", "workers", "pieces",
                 "query_side"}


# Columns of the output (and of the rows a job reads) that a kept column must not replace: always, and with
# --long-docs chunk. (`doc_id` always: the index takes an output with that column for a chunked one.)
OUTPUT_COLUMNS = ("id", "embedding", "n_tokens", "truncated", "doc_id")
CHUNK_COLUMNS = ("chunk", "token_start", "token_end")


class ConfigError(ValueError):
    """A job file key or flag has an invalid value."""


def _opt(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True)
class JobConfig:
    """Everything that defines an embedding job.

    Fields marked ``fingerprint=True`` change the vectors; they are hashed into the manifest so that a rerun
    with different values is refused instead of silently mixing two kinds of vectors in one output.
    """

    input: tuple[str, ...] = field(
        default=(), metadata=_opt("Input file, directory or glob (Parquet, JSONL[.gz|.zst], datasets dir).")
    )
    output: str = field(default="", metadata=_opt("Output directory (vectors/, manifest, logs)."))
    model: str = field(default="", metadata=_opt("Local model directory, pkg:PACKAGE/PATH, or hub id.", fp=True))
    text_field: str = field(
        default="text", metadata=_opt("Text column, or a template like '{title} {text}'.", fp=True)
    )
    id_field: str = field(default="id", metadata=_opt("Id column; absent: FILE#ROW ids.", fp=True))
    id_field_given: bool = field(
        default=False,
        metadata=_opt("Whether id_field was set (job file, flag): then every file must have it.", cli=False),
    )
    keep: tuple[str, ...] = field(default=(), metadata=_opt("Input columns copied to the output.", fp=True))
    dims: int | None = field(
        default=None, metadata=_opt("Matryoshka output dims (first N, re-normalised; default: all of the model's).",
                                    fp=True)
    )
    max_length: int | None = field(
        default=None, metadata=_opt("Max tokens per input (default: the model's limit).", fp=True)
    )
    instruction: str | None = field(
        default=None, metadata=_opt("Query instruction: 'Instruct: {TEXT}\\nQuery:{text}'.", fp=True)
    )
    prompt_name: PromptName | None = field(
        default=None, metadata=_opt("Prompt from the model's sentence-transformers config.", fp=True)
    )
    query_instruction: str | None = field(
        default=None,
        metadata=_opt("Instruction for queries at search time (default: the model's 'query' prompt)."),
    )
    pooling: Pooling = field(default="auto", metadata=_opt("Pooling (auto: from the model's files).", fp=True))
    normalize: bool = field(default=True, metadata=_opt("L2-normalise the output vectors.", fp=True))
    dtype: OutputDtype = field(default="float32", metadata=_opt("Stored vector dtype.", fp=True))
    compute_dtype: ComputeDtype = field(
        default="auto", metadata=_opt("Model precision (auto: bfloat16 on GPU, float32 on CPU).", fp=True)
    )
    long_docs: LongDocs = field(default="truncate", metadata=_opt("Over-long documents: truncate or chunk.", fp=True))
    chunk_tokens: int = field(default=512, metadata=_opt("Tokens per chunk with --long-docs chunk.", fp=True))
    chunk_overlap: int = field(default=64, metadata=_opt("Overlap between chunks, in tokens.", fp=True))
    trust_remote_code: bool = field(default=False, metadata=_opt("Allow the model's own code.", fp=True))
    shard_size: int | None = field(
        default=None,
        metadata=_opt("Rows per shard, the unit of progress and resume (default: sized by text bytes so that a shard "
                      "takes about a minute on the device).", plan=True),
    )
    on_bad_record: OnBadRecord = field(
        default="error", metadata=_opt("error: stop with file/row/field; skip: record in rejects/.", plan=True)
    )
    batch_tokens: int | None = field(
        default=None,
        metadata=_opt("Tokens per forward pass (padded: count x longest; packed: sum). "
                      "Default: 4096 on CPU, 16384 padded on GPU, 32768 packed."),
    )
    sort_window: int = field(default=50_000, metadata=_opt("Documents sorted by length together."))
    attention: Attention = field(
        default="auto",
        metadata=_opt("padded (SDPA + mask) or packed (padding-free; auto: packed for Qwen on GPU)."),
    )
    compile: bool | None = field(
        default=None,
        metadata=_opt("torch.compile the packed forward (default: on where it runs on CUDA, so for Qwen models "
                      "on a GPU)."),
    )
    backend: Backend = field(
        default="local",
        metadata=_opt("local: the model runs here; openai: an OpenAI-compatible /v1/embeddings server."),
    )
    endpoint: str | None = field(default=None, metadata=_opt("Server base URL for --backend openai."))
    api_model: str | None = field(default=None, metadata=_opt("Model name sent to the server (default: --model)."))
    concurrency: int = field(default=4, metadata=_opt("Requests in flight with --backend openai."))
    workers: int = field(default=1, metadata=_opt("Worker processes on this machine (CPU; see --gpus for GPUs)."))
    gpus: str | None = field(default=None, metadata=_opt("One worker per GPU: all, N, or ids like 0,1,3."))
    lease_seconds: int = field(
        default=300, metadata=_opt("A claim without heartbeat for this long is taken over by another worker.")
    )
    device: str | None = field(default=None, metadata=_opt("cpu, cuda or cuda:N (default: cuda if present)."))
    quiet: bool = field(default=False, metadata=_opt("No progress bar (cron)."))
    allow_empty: bool = field(
        default=False, metadata=_opt("Accept an input that holds no document (default: an error).")
    )
    index: dict[str, Any] | None = field(
        default=None,
        metadata=_opt("Build (or update) the FAISS index when the run completes: `index build` options.", cli=False),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = _literal_choices(f.type)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
        positive = ["shard_size", "batch_tokens", "sort_window", "chunk_tokens", "workers", "lease_seconds",
                    "concurrency"]
        if self.backend == "openai" and not self.endpoint:
            raise ConfigError("endpoint: --backend openai needs --endpoint URL")
        for name in positive + ["dims", "max_length"]:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}: {value!r} must be a positive integer")
        if self.dims is not None and self.dims < 8:
            raise ConfigError(f"dims: {self.dims} is too small (Matryoshka models support 32 and up)")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length: {self.max_length} must be at least 2")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ConfigError(
                f"chunk_overlap: {self.chunk_overlap} must be >= 0 and below chunk_tokens ({self.chunk_tokens})"
            )
        if self.index is not None:
            if not isinstance(self.index, dict):
                raise ConfigError(f"index: {self.index!r} must be a mapping of `index build` options (or true)")
            unknown = set(self.index) - INDEX_OPTIONS
            if unknown:
                raise ConfigError(f"index: unknown option(s) {', '.join(sorted(unknown))} "
                                  f"(known: {', '.join(sorted(INDEX_OPTIONS))})")
        reserved = set(OUTPUT_COLUMNS) | {"text", "_row", self.id_field}
        if self.long_docs == "chunk":
            reserved |= set(CHUNK_COLUMNS)
        clash = [name for name in self.keep if name in reserved]
        if clash:
            raise ConfigError(f"keep: {', '.join(map(repr, clash))} would replace a column the job makes (the id, the "
                              f"text or an output column: {', '.join(sorted(reserved))}); rename the input column")
        if self.instruction is not None and self.prompt_name is not None:
            raise ConfigError("instruction and prompt_name: give one of them, not both")

    def fingerprint(self) -> str:
        """Hash of every setting that changes the vectors (see the ``fp`` field metadata)."""
        return _hash({name: getattr(self, name) for name in fingerprint_fields()})

    def plan_settings(self) -> dict[str, Any]:
        """Settings that shape the plan (shard boundaries, rejected rows); fixed once a manifest exists."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("plan")}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def model_options(self) -> ModelOptions:
        """What the model layer needs of this job (it knows no ``JobConfig``)."""
        from pipeline.model.encoder import ModelOptions

        names = {f.name for f in dataclasses.fields(ModelOptions)}
        return ModelOptions(**{name: getattr(self, name) for name in names})


def fingerprint_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(JobConfig) if f.metadata.get("fp")]


def _literal_choices(tp: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation, else ()."""
    if isinstance(tp, str):
        tp = eval(tp, globals())  # annotations are strings under `from __future__ import annotations`
    args = get_args(tp)
    if args and all(isinstance(a, str) for a in args):
        return args
    for arg in args:
        inner = _literal_choices(arg)
        if inner:
            return inner
    return ()


def field_choices(name: str) -> tuple[str, ...]:
    """The allowed values of a Literal-typed field, for the CLI."""
    return _literal_choices({f.name: f for f in dataclasses.fields(JobConfig)}[name].type)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=_jsonable).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML job file into a dict of field values; unknown keys raise ``ConfigError``.

    Keys may be written with dashes or underscores (``batch-tokens`` or ``batch_tokens``). ``input`` and
    ``keep`` accept a string or a list. Relative input paths are taken relative to the current directory,
    as on the command line.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of keys to values")
    names = {f.name for f in dataclasses.fields(JobConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "inputs":
            name = "input"
        if name not in names:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        if name in ("input", "keep"):
            value = (value,) if isinstance(value, str) else tuple(value or ())
        if name == "index":
            value = {} if value is True else None if value is False else value
            if isinstance(value, dict):
                value = {str(k).replace("-", "_"): v for k, v in value.items()}
        values[name] = value
    return values


def make_config(values: dict[str, Any]) -> JobConfig:
    """Build and validate a ``JobConfig``; type errors name the key."""
    for name in ("input", "keep"):
        if name in values and values[name] is not None:
            values[name] = tuple(str(v) for v in values[name])
    ints = {"dims", "max_length", "shard_size", "batch_tokens", "sort_window", "chunk_tokens", "chunk_overlap",
            "workers", "lease_seconds", "concurrency"}
    for name in ints & values.keys():
        value = values[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name}: {value!r} must be an integer")
    for f in dataclasses.fields(JobConfig):  # a YAML job file gives any type: `text-field: {body}` is a mapping
        value = values.get(f.name)
        if f.type in ("str", "str | None") and value is not None and not isinstance(value, str):
            hint = " (in YAML, quote a template: '{title} {text}')" if isinstance(value, dict) else ""
            raise ConfigError(f"{f.name.replace('_', '-')}: {value!r} must be a string{hint}")
    values.setdefault("id_field_given", values.get("id_field") is not None)  # named, even as the default "id"
    try:
        cfg = JobConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
    if not cfg.input:
        raise ConfigError("input: give at least one input file, directory or glob")
    if not cfg.output:
        raise ConfigError("output: give an output directory")
    if not cfg.model:
        raise ConfigError("model: give a model directory or hub id")
    return cfg


def build_config(job_file: str | None, flags: dict[str, Any]) -> JobConfig:
    """Job file values, overridden by the flags that were given (None, or an empty tuple, is not given)."""
    values: dict[str, Any] = load_job_file(job_file) if job_file else {}
    for name, value in flags.items():
        if value is None or (name in ("input", "keep") and not value):
            continue
        values[name] = value
    return make_config(values)
