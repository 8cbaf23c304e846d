"""Runner: plan, then work the plan's shards (claimed one at a time, shared with any other worker), then commit.

- ``embed`` shards read their rows, check them against the plan (a row that changed since is an error, never a
  stale vector), embed each distinct new text once (the model is loaded only when some shard has one), copy the
  vectors of texts that a part already holds, and write the part;
- ``rewrite`` shards write a part again without its rows that left the corpus or changed;
- ``dup`` shards copy, once the embed shards are done, the vectors of rows whose text another shard embedded.

Reading and tokenizing the next shard runs in a background thread while the current one is encoded, and the
finished shard is written by another. Each shard is committed on its own (part, then done-marker); when every
shard of the plan is done, the worker that sees it makes the plan's version live (``versions.commit``).
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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import EncodeError, InputError, PipelineError
from pipeline.job import versions
from pipeline.job.assemble import PartCache, copied_table, output_table
from pipeline.job.canary import Accepted, check_canary, still_current
from pipeline.job.claims import DEFAULT_LEASE, Claims, PlanWatch, claimed
from pipeline.job.config import JobConfig
from pipeline.job.diff import find
from pipeline.job.manifest import DUP, EMBED, REUSE, SAME, Manifest, Shard, load_manifest, read_work
from pipeline.job.plan import check_own_folder, has_vectors, prepare
from pipeline.job.record import check_framing, check_model_files, record_query_side, write_job_record
from pipeline.job.records import FieldSpec, extract, iter_raw
from pipeline.job.scan import generated_id_hashes, hash128, id_hashes, keep_hashes
from pipeline.job.sink import (
    docs_path,
    docs_table,
    dups_path,
    is_done,
    mark_done,
    mark_failed,
    part_path,
    remove_stale_temp_files,
    write_atomic,
    write_part,
)
from pipeline.job.startup import ModelLoad
from pipeline.model.encoder import Embedder
from pipeline.model.identity import model_files
from pipeline.model.tokens import Encoded
from pipeline.util import attach_log_file, fault_point, locked, process_age

log = logging.getLogger(__name__)
# Shards read and tokenized ahead of the model. One is enough (reading and tokenizing a shard takes a fraction
# of embedding it), and a shard is claimed only when it starts loading: shards claimed far ahead are idle work
# that other workers cannot take at the end of a job (measured: with 2 ahead a worker held 4 claims).
PREFETCH = 1


@dataclass
class RunSummary:
    shards_done: int = 0
    shards_total: int = 0
    docs: int = 0  # documents written by this worker (embedded, copied or rewritten)
    sequences: int = 0
    tokens: int = 0  # tokens embedded by this worker
    seconds: float = 0.0
    stopped_early: bool = False
    failed: list[int] = field(default_factory=list)
    version: int = 0  # the live version when the run ended
    committed: bool = False  # this run made a new version live
    nothing_new: bool = False  # the input is what the live version holds
    replaced: bool = False  # another run replaced this run's plan (other input or settings): its work is not live
    counts: dict[str, int] = field(default_factory=dict)  # what the plan changes (see plan._counts)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0


# --------------------------------------------------------------------------------------------- reading


def read_rows(manifest: Manifest, shard: Shard, spec: FieldSpec, rows: np.ndarray | None = None) -> pa.Table:
    """Rows of an embed shard as ``id``, ``text``, kept columns, ``_row``, in row order: those of ``rows`` (sorted
    row numbers), else every valid row of the shard's range.

    Raises:
        InputError: a listed row is not valid any more (the file changed since it was planned).
    """
    planned = manifest.files[shard.file]
    tables = []
    for raw in iter_raw(planned.file, spec, row_start=shard.row_start, row_end=shard.row_end,
                        byte_start=shard.byte_start):
        table, _rejects = extract(raw, planned.file, spec, planned.generated_ids)
        tables.append(table)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if rows is not None:
        got = table.column("_row").to_numpy()
        pos = np.searchsorted(got, rows)
        ok = (pos < len(got)) & (got[np.minimum(pos, len(got) - 1)] == rows) if len(got) else np.zeros(len(rows), bool)
        if not ok.all():
            row = int(rows[~ok][0])
            raise InputError(f"{planned.file.path}: row {row} is not valid any more; the file changed since the run "
                             "was planned: run the same command again to plan over the current input")
        table = table.take(pa.array(pos))
    return table


def read_shard(manifest: Manifest, shard: Shard, spec: FieldSpec) -> pa.Table:
    """Every valid row of an embed shard's range (tests, benchmarks, search's texts)."""
    return read_rows(manifest, shard, spec)


def _check_rows(manifest: Manifest, shard: Shard, table: pa.Table, work: pa.Table, spec: FieldSpec) -> None:
    """The rows read are the rows planned: same id, text and kept values (else the file changed since)."""
    planned = manifest.files[shard.file]
    frow = work.column("frow").to_numpy()
    h = generated_id_hashes(planned.file, frow) if planned.generated_ids else id_hashes(table.column("id"))
    k = hash128(table.column("text").to_pylist())
    x = keep_hashes(table, spec.keep)
    want_h = np.stack([work.column("h1").to_numpy(), work.column("h2").to_numpy()], 1)
    want_k = np.stack([work.column("k1").to_numpy(), work.column("k2").to_numpy()], 1)
    bad = ~((h == want_h).all(1) & (k == want_k).all(1) & (x == work.column("x").to_numpy()))
    if bad.any():
        row = int(frow[np.flatnonzero(bad)[0]])
        raise InputError(f"{planned.file.path}: row {row} changed since the run was planned (its content digest no "
                         "longer matches): run the same command again to plan over the current input")


def _hkx(work: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.stack([work.column("h1").to_numpy(), work.column("h2").to_numpy()], 1),
            np.stack([work.column("k1").to_numpy(), work.column("k2").to_numpy()], 1), work.column("x").to_numpy())


def _concat_parts(tables: list[tuple[pa.Table, pa.Table]], work_rows: list[np.ndarray]
                  ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Concatenate output pieces; returns (table, work row of each document, first output row of each)."""
    nonempty = [(t, n) for t, n in tables if t.num_rows]
    table = pa.concat_tables([t for t, _ in nonempty], promote_options="permissive") if nonempty else tables[0][0]
    nseq = np.concatenate([n for _, n in tables])
    rows = np.concatenate(work_rows)
    prow = np.cumsum(nseq) - nseq
    return table, rows, prow


# --------------------------------------------------------------------------------------------- the run


def run_job(
    cfg: JobConfig,
    *,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    embedder: Embedder | ModelLoad | None = None,
    lease_seconds: float = DEFAULT_LEASE,
) -> RunSummary:
    """Plan, work every pending shard (shared with any other worker on the same output), and commit.

    Args:
        cfg: the job.
        overwrite: discard an existing output first.
        stop: when set, finish the current shard, give back the others and return (used on SIGTERM).
        embedder: a model already loaded for this job (benchmarks), or one being loaded (``ModelLoad``);
            default: load ``cfg.model``, on a GPU while the job is planned (``loads_during_planning``), on CPU
            after planning and only when a text must be embedded.
        lease_seconds: another worker's claim without a heartbeat for this long is taken over.

    Raises:
        InputError, ManifestMismatch, EncodeError, PipelineError: with a message for the user.
    """
    out = Path(cfg.output)
    check_own_folder(out)  # before its log file goes there
    out.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(out)
    try:
        from pipeline.job.sizing import check_model_settings, model_config

        if cfg.backend == "local" and embedder is None:
            check_model_settings(cfg, model_config(cfg))
        if embedder is None and loads_during_planning(cfg):
            embedder = ModelLoad(lambda: load_embedder(cfg))
        manifest = prepare(cfg, overwrite=overwrite)
        record_query_side(out, cfg)
        return _run(cfg, out, manifest, stop, embedder, lease_seconds)
    finally:
        age = process_age()
        log.info("worker done%s", "" if age is None else f", {age:.1f}s after the process started")
        logging.getLogger("pipeline").removeHandler(handler)
        handler.close()


def _needs_model(out: Path, manifest: Manifest) -> bool:
    """Whether a pending shard has a text to embed (otherwise the run never loads the model)."""
    for shard in manifest.shards:
        if shard.kind == "embed" and not is_done(out, shard):
            kinds = read_work(out, manifest, shard).column("kind").to_numpy()
            if (kinds == EMBED).any():
                return True
    return False


def try_commit(out: Path, manifest: Manifest) -> bool:
    """Make the plan's version live if every shard is done and no other run replaced the plan. Returns whether the
    plan is committed now."""
    with locked(out / ".plan.lock"):
        current = load_manifest(out)
        if current is None or current.plan_id != manifest.plan_id:
            return False
        if not current.committed:
            if any(not is_done(out, s) for s in current.shards):
                return False
            versions.commit(out, current)
            manifest.committed = True
    Claims(out).drop_committed(current.shards)  # left by a worker killed between a marker and its release
    return True


def _run(cfg: JobConfig, out: Path, manifest: Manifest, stop: threading.Event | None,
         embedder: Embedder | ModelLoad | None, lease_seconds: float) -> RunSummary:
    from tqdm import tqdm

    remove_stale_temp_files(out, 2 * lease_seconds)
    summary = RunSummary(shards_total=len(manifest.shards), counts=dict(manifest.counts))
    pending = [s for s in manifest.shards if not is_done(out, s)]
    log.info("%s: plan %s, version %d -> %d: %d shards, %d pending; %s", out, manifest.plan_id, manifest.base,
             manifest.target, len(manifest.shards), len(pending), manifest.counts)
    if manifest.committed:
        summary.version, summary.nothing_new = manifest.target, True
        return summary
    if pending and stop is not None and stop.is_set():  # a signal came before or while planning: no model work
        summary.stopped_early = True
        log.warning("stop requested before the model was loaded: %d shards left for the next run", len(pending))
        return summary
    spec = FieldSpec.of(cfg)
    accepted: Accepted | None = None  # the check texts' record this worker compared itself with
    if pending and (embedder is not None or _needs_model(out, manifest)):
        if isinstance(embedder, ModelLoad):
            embedder = embedder.result()
        embedder = embedder or load_embedder(cfg)
        files = model_files(cfg.model)  # the same name may have other weights than the kept vectors were made with
        kept = has_vectors(out)
        check_model_files(out, cfg.model, files, kept)
        check_framing(out, embedder.info, kept)
        # and what file digests cannot see: a server's model, the libraries, another node's copy of the model
        accepted = check_canary(out, manifest.fingerprint, embedder, kept, lease_seconds, spec)
        write_job_record(out, cfg, embedder, files)
    cache = PartCache(out)

    def load(shard: Shard) -> dict[str, Any]:
        if shard.kind == "dup":
            return {}
        work = read_work(out, manifest, shard)
        if shard.kind != "embed":
            return {"work": work}
        kinds = work.column("kind").to_numpy()
        t0 = time.perf_counter()
        table = read_rows(manifest, shard, spec, work.column("frow").to_numpy())
        _check_rows(manifest, shard, table, work, spec)
        t1 = time.perf_counter()
        owners = np.flatnonzero(kinds == EMBED)
        enc = embedder.tokenizer.encode(table.column("text").take(pa.array(owners)).to_pylist()) if len(owners) \
            else None
        return {"work": work, "table": table, "owners": owners, "enc": enc,
                "timing": {"read_s": t1 - t0, "tokenize_s": time.perf_counter() - t1}}

    def embed_part(shard: Shard, item: dict[str, Any], vectors: np.ndarray | None) -> tuple[pa.Table, pa.Table, int]:
        work, table, owners, enc = item["work"], item["table"], item["owners"], item["enc"]
        kinds = work.column("kind").to_numpy()
        pieces, rows_of = [], []
        emb = np.flatnonzero((kinds == EMBED) | (kinds == SAME))
        if len(emb):
            frow = work.column("frow").to_numpy()
            owner_frow = work.column("owner_frow").to_numpy()
            owner_pos = np.searchsorted(frow[owners], owner_frow[emb])  # owners are sorted by row, as is frow
            t, nseq = output_table(table.take(pa.array(emb)), enc, vectors, cfg, owner=owner_pos)
            pieces.append((t, nseq))
            rows_of.append(emb)
        reuse = np.flatnonzero(kinds == REUSE)
        if len(reuse):
            src = [work.column(c).to_numpy()[reuse] for c in ("src_part", "src_prow", "src_nseq")]
            t = copied_table(cache, table.take(pa.array(reuse)), *src, cfg)
            pieces.append((t, src[2]))
            rows_of.append(reuse)
        dup = np.flatnonzero(kinds == DUP)
        if len(dup):  # copied by the shard's dup shard once every embed shard is done
            side = table.take(pa.array(dup)).select(["id", *cfg.keep])
            write_atomic(side.append_column("_row", pa.array(work.column("frow").to_numpy()[dup])),
                         dups_path(out, shard.id))
        if not pieces:
            empty = output_table(table.slice(0, 0), Encoded(np.zeros(0, np.int32), np.zeros(1, np.int64),
                                 np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, 2), np.int32),
                                 np.zeros(0, bool)), np.zeros((0, 1), np.float32), cfg)
            pieces.append(empty)
            rows_of.append(np.zeros(0, np.int64))
        part, rows, prow = _concat_parts(pieces, rows_of)
        h, k, x = _hkx(work.take(pa.array(rows)))
        nseq = np.concatenate([n for _, n in pieces])
        return part, docs_table(h, k, x, prow, nseq), int(enc.lengths.sum()) if enc is not None else 0

    def rewrite_part(shard: Shard, item: dict[str, Any]) -> tuple[pa.Table, pa.Table, int]:
        work = item["work"]
        docs = pq.read_table(docs_path(out, shard.source))
        first = docs.column("prow").to_numpy()
        if "drop_prow" in work.column_names:  # the documents that leave
            keep = np.flatnonzero(~np.isin(first, work.column("drop_prow").to_numpy()))
        else:  # a plan made by an earlier version listed those that stay
            keep = np.searchsorted(first, work.column("prow").to_numpy())
        kept = docs.take(pa.array(keep))
        prow, nseq = kept.column("prow").to_numpy(), kept.column("nseq").to_numpy()
        if len(kept) != shard.docs:
            raise PipelineError(f"{out}: part {shard.source} holds {len(kept)} of the {shard.docs} documents its "
                                "rewrite should keep; rerun the same command")
        source = pq.read_table(part_path(out, shard.source))
        rows = np.concatenate([np.arange(p, p + n) for p, n in zip(prow, nseq, strict=True)]) if len(prow) \
            else np.zeros(0, np.int64)
        part = source.take(pa.array(rows))
        new_prow = np.cumsum(nseq) - nseq
        return part, kept.set_column(kept.schema.get_field_index("prow"), "prow", pa.array(new_prow)), 0

    def dup_part(shard: Shard, item: dict[str, Any]) -> tuple[pa.Table, pa.Table, int]:
        source = next(s for s in manifest.shards if s.id == shard.source)
        work = read_work(out, manifest, source)
        kinds = work.column("kind").to_numpy()
        dup = np.flatnonzero(kinds == DUP)
        w = work.take(pa.array(dup))
        side = pq.read_table(dups_path(out, source.id))
        h, k, x = _hkx(w)
        owner_shard = w.column("owner_shard").to_numpy()
        part = np.zeros(len(dup), np.int64)
        prow = np.zeros(len(dup), np.int64)
        nseq = np.zeros(len(dup), np.int64)
        for o in np.unique(owner_shard):
            owned = versions.part_placements(out, int(o))
            sel = np.flatnonzero(owner_shard == o)
            pos = find([owned.k[:, 0], owned.k[:, 1]], np.argsort(owned.k[:, 0]), [k[sel, 0], k[sel, 1]])
            if (pos < 0).any():
                raise PipelineError(f"{out}: part {int(o)} does not hold the text of {int((pos < 0).sum())} "
                                    f"documents of shard {source.id} that it should embed; rerun the same command")
            part[sel], prow[sel], nseq[sel] = o, owned.prow[pos], owned.nseq[pos]
        table = copied_table(cache, side, part, prow, nseq, cfg)
        return table, docs_table(h, k, x, np.cumsum(nseq) - nseq, nseq), 0

    def commit_shard(shard: Shard, made: tuple[pa.Table, pa.Table, int], t0: float, timing: dict[str, float]
                     ) -> None:
        try:
            _commit_shard(shard, made, t0, timing)
        except BaseException:
            # This shard will not be done by us: stop claiming, or the loop would wait for it forever (a full disk)
            halt.set()
            raise

    def _commit_shard(shard: Shard, made: tuple[pa.Table, pa.Table, int], t0: float, timing: dict[str, float]
                      ) -> None:
        table, docs, tokens = made
        if not claims.owns(shard):
            log.warning("shard %d: the claim was taken over by another worker; dropping this result", shard.id)
            claims.forget(shard)
            return
        if accepted is not None and shard.kind == "embed":
            still_current(accepted)  # a worker with another model replaced it (while no vector was kept)
        write_part(out, shard.id, table, docs)
        seconds = time.perf_counter() - t0
        mark_done(out, shard, {"kind": shard.kind, "rows": docs.num_rows, "sequences": table.num_rows,
                               "tokens": tokens, "seconds": round(seconds, 4), "worker": claims.worker,
                               **{k: round(v, 4) for k, v in timing.items()}})
        fault_point("after-marker")
        claims.release(shard)
        summary.shards_done += 1
        summary.docs += docs.num_rows
        summary.sequences += table.num_rows
        log.info("shard %d (%s) done: %d documents, %d tokens, %.2fs", shard.id, shard.kind, docs.num_rows, tokens,
                 seconds)

    bar = tqdm(total=sum(s.docs for s in pending), unit="doc", disable=cfg.quiet, dynamic_ncols=True,
               desc="embedding")
    # Parts are written by one background thread while the next shard is encoded; at most one shard waits.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
    writing: Future | None = None
    halt = threading.Event()  # set when this loop ends, so the claiming thread stops at once
    start = time.perf_counter()
    with Claims(out, lease_seconds) as claims:
        shards = _prefetch(claimed(manifest, claims, halt, stop), load, PREFETCH)
        waited_since = time.perf_counter()
        try:
            for shard, item in shards:
                t0 = time.perf_counter()
                # Where a shard's time goes besides the model: reading and checking its rows and tokenizing them
                # (in the prefetch thread, while the previous shard is embedded), waiting for that (wait_s: the
                # model idle), and waiting for the previous part to be written (write_wait_s).
                timing = {**item.get("timing", {}), "wait_s": t0 - waited_since}
                if writing is None:  # this worker's first shard
                    age = process_age()
                    log.info("first shard %d: read in %.2fs, tokenized in %.2fs%s", shard.id,
                             timing.get("read_s", 0.0), timing.get("tokenize_s", 0.0),
                             "" if age is None else f"; it starts {age:.1f}s after the process started")
                vectors = None
                if shard.kind == "embed" and item["enc"] is not None:
                    enc, table = item["enc"], item["table"]
                    first_chunk = enc.chunk == 0
                    owners = item["owners"]

                    def progress(batch: np.ndarray, enc: Encoded = enc, first: np.ndarray = first_chunk,
                                 shard: Shard = shard) -> None:
                        summary.tokens += int(enc.lengths[batch].sum())
                        n = int(first[batch].sum())
                        bar.update(n)
                        claims.progress(shard, n)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"{summary.tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)

                    try:
                        vectors = embedder.embed_encoded(enc, window=cfg.sort_window, on_batch=progress)
                    except EncodeError as exc:
                        if exc.index is not None:
                            doc_id = table.column("id")[int(owners[int(enc.doc[exc.index])])].as_py()
                            exc = EncodeError(f"shard {shard.id}: document {doc_id!r}: {exc}", exc.index)
                        mark_failed(out, shard, str(exc))
                        summary.failed.append(shard.id)
                        raise exc from None
                    bar.update(max(0, shard.docs - len(owners)))
                else:
                    bar.update(shard.docs)
                t_made = time.perf_counter()
                timing["model_s"] = t_made - t0
                made = (embed_part(shard, item, vectors) if shard.kind == "embed" else
                        rewrite_part(shard, item) if shard.kind == "rewrite" else dup_part(shard, item))
                timing["assemble_s"] = time.perf_counter() - t_made
                t_write = time.perf_counter()
                if writing is not None:
                    writing.result()
                timing["write_wait_s"] = time.perf_counter() - t_write
                writing = writer.submit(commit_shard, shard, made, t0, timing)
                waited_since = time.perf_counter()
                if stop is not None and stop.is_set():
                    break
            if writing is not None:
                writing.result()
        except Exception:
            if PlanWatch(out, manifest).state() != "replaced":
                raise
            # another run replaced the plan and removed its work tables (or the whole output: --overwrite)
            log.warning("%s: the plan was replaced by another run while this worker read it", out, exc_info=True)
        finally:
            halt.set()  # before the prefetch is closed: its claiming thread may be waiting for this (a failed commit)
            shards.close()
            writer.shutdown(wait=True)
            bar.close()
            summary.seconds = time.perf_counter() - start
    state = PlanWatch(out, manifest).state()
    if state == "replaced":
        summary.replaced = True
        return summary
    if state == "committed":  # by this worker or another (its shards with no document have no part any more)
        summary.committed = True
    elif state == "open" and stop is not None and stop.is_set() and any(not is_done(out, s) for s in manifest.shards):
        summary.stopped_early = True
        log.warning("stop requested: %d shards left for the next run",
                    sum(not is_done(out, s) for s in manifest.shards))
        return summary
    elif state == "open" and all(is_done(out, s) for s in manifest.shards):
        summary.committed = try_commit(out, manifest)
    summary.version = versions.live_version(out)
    return summary


def _prefetch(items: Iterable[Shard], load, depth: int) -> Iterator[tuple[Shard, Any]]:
    """Yield ``(shard, load(shard))`` with up to ``depth`` shards loaded ahead in a background thread.

    The next item is taken from ``items`` (for a job: claimed) only when fewer than ``depth`` loaded shards are
    waiting for the consumer, so at most ``depth`` shards are held ahead of the one being embedded.
    """
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()

    def work() -> None:
        it = iter(items)
        try:  # around the claiming too: a claim that cannot be written (a full disk) must not hang the consumer
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                shard = next(it, None)
                if shard is None:
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
            slots.release()
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


def loads_during_planning(cfg: JobConfig) -> bool:
    """Whether the model is loaded while the job is planned: for a local model that may go to a GPU (device
    unset or CUDA), where loading and compiling take tens of seconds. On CPU (and for a remote backend) it is
    loaded after planning, and only when a text must be embedded, so bad input or a job with nothing left to do
    costs no model load."""
    return cfg.backend != "openai" and not (cfg.device or "").startswith("cpu")


def load_embedder(cfg: JobConfig):
    """The job's embedder: the model loaded here, or a client of an OpenAI-compatible server."""
    if cfg.backend == "openai":
        from pipeline.model.remote import RemoteEmbedder

        return RemoteEmbedder.from_options(cfg.model_options(), endpoint=cfg.endpoint or "", api_model=cfg.api_model,
                                           concurrency=cfg.concurrency)
    return Embedder.from_options(cfg.model_options())
