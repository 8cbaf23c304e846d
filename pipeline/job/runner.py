"""Runner: plan, load the model, then for each pending shard read -> tokenize -> batch -> encode -> write.

Reading and tokenizing the next shard runs in a background thread while the current one is encoded (the
tokenizer and Arrow release the GIL), and the finished shard is written by another, so the model waits for
input or output as little as possible. Each shard is committed on its own (part file, then done-marker), so an
interrupted run loses at most the shards in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import EncodeError, InputError
from pipeline.job.claims import DEFAULT_LEASE, Claims
from pipeline.job.config import JobConfig
from pipeline.job.plan import Manifest, Shard, prepare
from pipeline.job.record import write_job_record
from pipeline.job.records import FieldSpec, extract, iter_raw
from pipeline.job.sink import embedding_array, is_done, mark_done, mark_failed, write_part
from pipeline.model.encoder import Embedder
from pipeline.model.tokens import Encoded
from pipeline.util import attach_log_file

log = logging.getLogger(__name__)
PREFETCH = 2  # shards read and tokenized ahead of the model


@dataclass
class RunSummary:
    shards_done: int = 0
    shards_total: int = 0
    docs: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    failed: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0


def read_shard(manifest: Manifest, shard: Shard, spec: FieldSpec) -> pa.Table:
    """The shard's valid rows as ``id``, ``text``, kept columns, ``_row``; planned rejects are left out.

    Raises:
        InputError: a row that was valid when planned is not any more (the file changed).
    """
    planned = manifest.files[shard.file]
    skip = set(shard.skip)
    tables = []
    for raw in iter_raw(planned.file, spec, row_start=shard.row_start, row_end=shard.row_end,
                        byte_start=shard.byte_start):
        table, rejects = extract(raw, planned.file, spec, planned.generated_ids)
        new = [r for r in rejects if r.row not in skip]
        if new:
            raise InputError(f"{new[0].message()} (this row was valid when the job was planned: did the file change?)")
        tables.append(table)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if skip:
        table = table.filter(pc.invert(pc.is_in(table.column("_row"), pa.array(sorted(skip), pa.int64()))))
    return table


def output_table(table: pa.Table, enc: Encoded, vectors: np.ndarray, cfg: JobConfig) -> pa.Table:
    """One output row per sequence: id, embedding, n_tokens, truncated, (chunk columns), kept columns."""
    docs = pa.array(enc.doc)
    ids = table.column("id").take(docs)
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    if cfg.long_docs == "chunk":
        chunk = pa.array(enc.chunk)
        cols["id"] = pc.binary_join_element_wise(ids, pc.cast(chunk, pa.string()), "#")
        cols["doc_id"] = ids
        cols["chunk"] = chunk
        cols["token_start"] = pa.array(enc.span[:, 0])
        cols["token_end"] = pa.array(enc.span[:, 1])
    else:
        cols["id"] = ids
    cols["embedding"] = embedding_array(vectors, cfg.dtype)
    cols["n_tokens"] = pa.array(enc.lengths.astype(np.int32))
    cols["truncated"] = pa.array(enc.truncated)
    for name in cfg.keep:
        cols[name] = table.column(name).take(docs)
    return pa.table(cols)


def _prefetch(items: Iterable[Shard], load, depth: int) -> Iterator[tuple[Shard, object]]:
    """Yield ``(shard, load(shard))`` with up to ``depth`` shards loaded ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:  # around the claiming too: a claim that cannot be written (a full disk) must not hang the consumer
            for shard in items:
                if stop.is_set():
                    break
                q.put((shard, load(shard), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((None, None, exc))
            return
        q.put(None)

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            shard, value, exc = item
            if exc is not None:
                raise exc
            yield shard, value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


def run_job(
    cfg: JobConfig,
    *,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    embedder: Embedder | None = None,
    lease_seconds: float = DEFAULT_LEASE,
) -> RunSummary:
    """Embed every pending shard of the job, sharing them with any other worker on the same output.

    Args:
        cfg: the job.
        overwrite: discard an existing output first.
        stop: when set, finish the current shard, give back the others and return (used on SIGTERM).
        embedder: a model already loaded for this job (benchmarks); default: load ``cfg.model``.
        lease_seconds: another worker's claim without a heartbeat for this long is taken over.

    Raises:
        InputError, ManifestMismatch, EncodeError, PipelineError: with a message for the user.
    """
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(out)
    try:
        return _run(cfg, out, overwrite, stop, embedder, lease_seconds)
    finally:
        logging.getLogger("pipeline").removeHandler(handler)
        handler.close()


def _claimed(manifest: Manifest, claims: Claims, halt: threading.Event, stop: threading.Event | None
             ) -> Iterator[Shard]:
    """Shards this worker claims, in manifest order, until none is left; waits while others hold live claims
    (a dead worker's claims go stale after the lease and are taken over). Ends once ``halt`` or ``stop`` is set."""
    out = claims.out

    def ended() -> bool:
        return halt.is_set() or (stop is not None and stop.is_set())

    pause = 0.25  # between looks at others' claims: short at first (a peer finishing its last shard), then
    # longer, up to a tenth of the lease, so that many idle workers do not keep scanning a shared filesystem
    while not ended():
        for shard in manifest.shards:
            if ended():
                return
            if shard.id not in claims.held and not is_done(out, shard) and claims.try_claim(shard):
                pause = 0.25
                yield shard
        pending = [s for s in manifest.shards if not is_done(out, s)]
        if not pending:
            return
        left = [s for s in pending if s.id not in claims.held]
        if not left:
            # Only this worker's own shards are in flight. Keep watching until they are committed: one whose
            # result is dropped (its claim was taken over while this worker stalled) is back in play.
            halt.wait(0.2)
            continue
        claims.note_waiting(left)  # which shards, which workers, when their leases run out (WARNING once)
        pause = min(2 * pause, 5.0, claims.lease / 10)
        halt.wait(pause)


def _run(
    cfg: JobConfig, out: Path, overwrite: bool, stop: threading.Event | None, embedder: Embedder | None,
    lease_seconds: float,
) -> RunSummary:
    from tqdm import tqdm

    manifest = prepare(cfg, overwrite=overwrite)
    remove_stale_temp_files(out, 2 * lease_seconds)
    pending = [s for s in manifest.shards if not is_done(out, s)]
    summary = RunSummary(shards_total=len(manifest.shards))
    log.info("%s: %d shards, %d pending", out, len(manifest.shards), len(pending))
    if not pending:
        return summary
    if stop is not None and stop.is_set():  # a signal came before or while planning: no model work
        summary.stopped_early = True
        log.warning("stop requested before the model was loaded: %d shards left for the next run", len(pending))
        return summary
    embedder = embedder or load_embedder(cfg)
    write_job_record(out, cfg, embedder)
    spec = FieldSpec(cfg.text_field, cfg.id_field, cfg.keep)

    def load(shard: Shard) -> tuple[pa.Table, Encoded]:
        table = read_shard(manifest, shard, spec)
        return table, embedder.tokenizer.encode(table.column("text").to_pylist())

    def commit(shard: Shard, table: pa.Table, enc: Encoded, vectors: np.ndarray, t0: float) -> None:
        try:
            _commit(shard, table, enc, vectors, t0)
        except BaseException:
            # This shard will not be done by us: stop claiming, or the loop would wait for it forever (a full disk)
            halt.set()
            raise

    def _commit(shard: Shard, table: pa.Table, enc: Encoded, vectors: np.ndarray, t0: float) -> None:
        if not claims.owns(shard):
            log.warning("shard %d: the claim was taken over by another worker; dropping this result", shard.id)
            claims.forget(shard)
            return
        write_part(out, shard, output_table(table, enc, vectors, cfg))
        seconds = time.perf_counter() - t0
        tokens = int(enc.lengths.sum())
        mark_done(out, shard, {"rows": table.num_rows, "sequences": len(enc), "tokens": tokens,
                               "seconds": round(seconds, 4), "worker": claims.worker})
        claims.release(shard)
        summary.shards_done += 1
        summary.docs += table.num_rows
        summary.sequences += len(enc)
        log.info("shard %d done: %d rows, %d tokens, %.2fs", shard.id, table.num_rows, tokens, seconds)

    bar = tqdm(total=sum(manifest.shard_rows(s) for s in pending), unit="doc", disable=cfg.quiet,
               dynamic_ncols=True, desc="embedding")
    # Parts are written by one background thread while the next shard is encoded; at most one shard waits.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
    writing: Future | None = None
    halt = threading.Event()  # set when this loop ends, so the claiming thread stops at once
    start = time.perf_counter()
    with Claims(out, lease_seconds) as claims:
        shards = _prefetch(_claimed(manifest, claims, halt, stop), load, PREFETCH)
        try:
            for shard, (table, enc) in shards:
                t0 = time.perf_counter()
                first_chunk = enc.chunk == 0

                def progress(batch: np.ndarray, enc: Encoded = enc, first_chunk: np.ndarray = first_chunk) -> None:
                    summary.tokens += int(enc.lengths[batch].sum())
                    bar.update(int(first_chunk[batch].sum()))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{summary.tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)

                try:
                    vectors = embedder.embed_encoded(enc, window=cfg.sort_window, on_batch=progress)
                except EncodeError as exc:
                    if exc.index is not None:
                        doc_id = table.column("id")[int(enc.doc[exc.index])].as_py()
                        exc = EncodeError(f"shard {shard.id}: document {doc_id!r}: {exc}", exc.index)
                    mark_failed(out, shard, str(exc))
                    summary.failed.append(shard.id)
                    raise exc from None
                if writing is not None:
                    writing.result()
                writing = writer.submit(commit, shard, table, enc, vectors, t0)
                if stop is not None and stop.is_set():
                    break
            if writing is not None:
                writing.result()
        finally:
            halt.set()  # before the prefetch is closed: its claiming thread may be waiting for this (a failed commit)
            shards.close()
            writer.shutdown(wait=True)
            bar.close()
            summary.seconds = time.perf_counter() - start
    if stop is not None and stop.is_set() and any(not is_done(out, s) for s in manifest.shards):
        summary.stopped_early = True
        log.warning("stop requested: %d shards left for the next run",
                    sum(not is_done(out, s) for s in manifest.shards))
    return summary


def remove_stale_temp_files(out: Path, older_than: float) -> None:
    """Delete temporary part/marker files left by killed workers (older than any live worker's could be)."""
    now = time.time()
    for folder in (out / "vectors", out / "shards"):
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp-*"):
            try:
                if now - path.stat().st_mtime > older_than:
                    path.unlink()
            except OSError:
                pass


def load_embedder(cfg: JobConfig):
    """The job's embedder: the model loaded here, or a client of an OpenAI-compatible server."""
    if cfg.backend == "openai":
        from pipeline.model.remote import RemoteEmbedder

        return RemoteEmbedder.from_options(cfg.model_options(), endpoint=cfg.endpoint or "", api_model=cfg.api_model,
                                           concurrency=cfg.concurrency)
    return Embedder.from_options(cfg.model_options())
