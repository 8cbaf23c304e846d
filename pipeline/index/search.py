"""Search: embed queries the way the job recorded, search its index, map positions back to ids and texts.

Queries go through ``job.record.query_embedder(OUTPUT)``: the job's model, pooling, max length, output dims and
normalisation, with its query instruction (``query_instruction``, else the model's ``query`` prompt). The index
returns positions; the id map (``OUTPUT/index/ids-*.parquet``) turns them into ids, shards and rows; texts are not
stored with the vectors, so they are read back from the input files through the manifest, for the top k only.

Results are ``{"query": ..., "results": [{"id", "score", "text"}, ...]}``; with a reranker each result also has
``rerank_score`` and the list is ordered by it. Scores: inner product for ``ip`` indexes (cosine on normalised
vectors), minus the squared distance for ``l2`` ones, so larger is always closer.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.index.files import index_dir, load_index, read_info, search_filter
from pipeline.index.params import search as filtered_search
from pipeline.job.versions import live_version
from pipeline.util import file_key

log = logging.getLogger(__name__)

ID_MAP_GROUPS = 64  # row groups of the id map kept in memory (65,536 rows each as written: 4M rows)
QUERY_BATCH = 256


class IdMap:
    """Position -> (id, shard, row[, doc_id, token_start, token_end]) from the id map Parquet file.

    Row groups are read when a position in them is first asked for (a one-shot search reads a few, not the whole
    map: 1.8 s for 1.5M ids measured here), and the last ``ID_MAP_GROUPS`` are kept.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = pq.ParquetFile(path)
        meta = self.file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, positions: np.ndarray) -> pa.Table:
        """Rows for ``positions`` (int64, all valid), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return self.file.schema_arrow.empty_table()
        groups = np.searchsorted(self.starts, positions, side="right") - 1
        pieces = []
        for g in np.unique(groups):
            table = self._group(int(g))
            sel = np.flatnonzero(groups == g)
            pieces.append((sel, table.take(pa.array(positions[sel] - self.starts[g]))))
        merged = pa.concat_tables([t for _, t in pieces])
        order = np.argsort(np.concatenate([s for s, _ in pieces]), kind="stable")
        return merged.take(pa.array(order))

    def _group(self, g: int) -> pa.Table:
        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        table = self.file.read_row_group(g)
        self._groups[g] = table
        if len(self._groups) > ID_MAP_GROUPS:
            self._groups.popitem(last=False)
        return table


class TextSource:
    """Texts (and kept columns) of indexed vectors, read back from the inputs (``job.texts.DocumentTexts``).

    When the inputs cannot be read any more (moved, changed), texts are None and a warning says why, once.
    """

    def __init__(self, output: Path, job: dict[str, Any], tokenizer=None) -> None:
        from pipeline.job.records import FieldSpec
        from pipeline.job.texts import DocumentTexts

        cfg = job.get("config", {})
        self.keep = tuple(cfg.get("keep") or ())
        spec = FieldSpec(cfg.get("text_field", "text"), cfg.get("id_field", "id"), self.keep)
        self.documents = DocumentTexts(output, spec)
        self.tokenizer = tokenizer

    def lookup(self, rows: pa.Table) -> tuple[list[str | None], list[dict[str, Any]]]:
        """Texts and kept columns for id-map rows (``shard``: the part, ``row``: the row in it); chunk rows give
        their chunk's text."""
        found = self.documents.lookup(rows.column("shard").to_pylist(), rows.column("row").to_pylist())
        texts: list[str | None] = [f[0] if f else None for f in found]
        fields: list[dict[str, Any]] = [f[1] if f else {} for f in found]
        if "doc_id" in rows.column_names and self.tokenizer is not None:
            spans = zip(rows.column("token_start").to_pylist(), rows.column("token_end").to_pylist(), strict=True)
            texts = [self._chunk_text(t, s, e) if t is not None else None for t, (s, e) in zip(texts, spans,
                                                                                               strict=True)]
        return texts, fields

    def _chunk_text(self, text: str, start: int, end: int) -> str:
        """The document's own characters under its tokens ``[start, end)`` (spans index the text's own tokens).

        Cut from the text by the tokenizer's character offsets, not decoded: an uncased tokenizer's decoding is
        lowercased and without accents ("emile zola etait" for "Émile Zola était"), and that was shown as the
        result's text and handed to the reranker. A tokenizer without offsets (a slow one) decodes.
        """
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return self.tokenizer.decode(ids[start:end])
        end = min(end, len(offsets))
        if start >= end:
            return ""
        return text[offsets[start][0]:offsets[end - 1][1]]


def _version_key(out: Path) -> tuple[int, int, int]:
    """The live version's number and its folder's inode and change time: an output started over (``--overwrite``)
    numbers its versions from 1 again, in new folders."""
    number = live_version(out)
    try:
        st = os.stat(Path(out) / "vectors")
    except OSError:
        return number, 0, 0
    return number, st.st_ino, st.st_ctime_ns


def _info_key(out: Path) -> tuple[int, ...]:
    """Which ``index/info.json`` is current (written by rename: each generation is a new file)."""
    return file_key(index_dir(out) / "info.json") or (0, 0, 0)


def _same_model(given: str, recorded: str) -> bool:
    from pipeline.model.encoder import resolve_model_path

    if given == recorded:
        return True
    try:
        a, b = Path(resolve_model_path(given)), Path(resolve_model_path(recorded))
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except PipelineError:
        return False


class Searcher:
    """Search one output directory's index.

    Args:
        output: the job's output directory (with ``job.json`` and ``index/``).
        model: the model the caller means to embed queries with; refused unless it is the job's (vectors of two
            models are not comparable). None: the job's.
        device: where the query model runs.
        embedder: an already loaded query embedder (tests, or to share one); must match the job.

    Raises:
        PipelineError: no index, no ``job.json``, another model, dims that differ between the job and the index,
            or an index built from other vectors than the job's current ones.

    Example:
        >>> s = Searcher("out/")                                   # doctest: +SKIP
        >>> s.search(["how do pandas eat?"], k=3)[0]["results"][0]  # doctest: +SKIP
        {'id': 'doc17', 'score': 0.71, 'text': 'Giant pandas eat bamboo ...'}
    """

    def __init__(self, output: str | Path, *, model: str | None = None, device: str | None = None,
                 embedder=None, trust_remote_code: bool = False) -> None:
        from pipeline.job.record import JobWatch, query_embedder, read_job_record

        self.out = Path(output)
        self.info = read_info(self.out)
        self.job = read_job_record(self.out)
        self._job_watch = JobWatch(self.out, self.job)
        recorded = self.job["config"]["model"]
        if model is not None and not _same_model(model, recorded):
            raise PipelineError(f"the index of {self.out} holds vectors of model {recorded!r}; queries must be "
                                f"embedded with the same model, not {model!r}")
        job_dims = int(self.job["model"]["dims"])
        if job_dims != int(self.info["dims"]):
            raise PipelineError(f"dims mismatch: the job embeds to {job_dims} dims but the index holds "
                                f"{self.info['dims']}-dim vectors; rebuild it with `embed-corpus index build "
                                f"{self.out}`")
        self._check_fingerprint(self.info)
        # The index and its id map first: a missing file is reported before the model's load.
        self._load(self.info, _info_key(self.out))
        vanished = len(self.info["parts"]) - len(self.live_parts)
        if vanished:
            log.warning("%d indexed parts of %s have vanished since the index was updated: their vectors are left "
                        "out of every result; `embed-corpus index update %s` removes them", vanished, self.out,
                        self.out)
        try:
            self.embedder = embedder or query_embedder(self.out, device=device,
                                                       trust_remote_code=trust_remote_code)
        except ValueError as exc:  # e.g. a query prompt longer than the job's max_length
            raise PipelineError(f"cannot embed queries as the job of {self.out} does: {exc}") from exc
        info = self.embedder.info
        if info.dims != int(self.info["dims"]):
            raise PipelineError(f"dims mismatch: queries embed to {info.dims} dims, the index holds "
                                f"{self.info['dims']}-dim vectors")
        if embedder is not None and not _same_model(info.model, recorded):
            raise PipelineError(f"the query embedder uses {info.model!r}, the index holds vectors of {recorded!r}")
        self.texts = TextSource(self.out, self.job, getattr(self.embedder.tokenizer, "tokenizer", None))

    def _check_fingerprint(self, info: dict[str, Any]) -> None:
        fp = info.get("job_fingerprint")
        if fp and self.job.get("fingerprint") and fp != self.job["fingerprint"]:
            raise PipelineError(f"the index of {self.out} was built from vectors made with other settings "
                                f"(fingerprint {fp}, the job's is now {self.job['fingerprint']}); rebuild it with "
                                f"`embed-corpus index build {self.out}`")

    def _load(self, info: dict[str, Any], key: tuple[int, ...]) -> None:
        """Take the index generation ``info`` names: the index (mapped, not read: start-up does not grow with its
        size, and only the pages a query touches are read), its id map, and the filter that leaves out the
        vectors of removed parts and of parts the live version no longer has."""
        index, _ = load_index(self.out, info, mmap=True)
        ids = IdMap(index_dir(self.out) / info["files"]["ids"])
        version = _version_key(self.out)
        self.filter, self.live_parts, self.live_starts = search_filter(self.out, info)
        self.info, self.index, self.ids, self._version, self._index_key = info, index, ids, version, key
        self.metric = info["metric"]  # a rebuild may change it (ip -> l2): scores follow the generation's

    def follow_live_version(self) -> None:
        """Follow what runs and index updates did since this searcher looked (a readlink and two stats per call),
        so that a server or a stdin search loop that outlives a nightly run answers as a fresh search would: a new
        index generation (``index update``, ``index build``) is taken whole (index, id map, filter); a version
        committed since leaves out the indexed parts it no longer has (parts it added wait for the index update),
        and texts are read through it.

        Raises:
            PipelineError: the index was rebuilt from vectors of other settings, or ``job.json`` says to embed
                queries otherwise than this searcher does (a restart says what to do).
        """
        if self._job_watch.changed():
            raise PipelineError(self._job_watch.message())
        key = _info_key(self.out)
        if key != self._index_key:
            info = read_info(self.out)
            if int(info["dims"]) != int(self.info["dims"]):
                raise PipelineError(f"the index of {self.out} was rebuilt with {info['dims']}-dim vectors; this "
                                    f"searcher embeds {self.info['dims']}-dim queries: start it again")
            self._check_fingerprint(info)
            self._load(info, key)
            self.texts = TextSource(self.out, self.job, self.texts.tokenizer)
            log.info("%s: index generation %s taken (%d vectors)", self.out, info.get("generation"),
                     self.index.ntotal)
        now = _version_key(self.out)
        if now != self._version:
            self.filter, self.live_parts, self.live_starts = search_filter(self.out, self.info)
            self.texts = TextSource(self.out, self.job, self.texts.tokenizer)
            self._version = now

    def embed(self, queries: Sequence[str]) -> np.ndarray:
        """float32 (len(queries), dims) query vectors, as the job would embed them.

        Raises:
            PipelineError: an empty query.
        """
        from pipeline.job.records import is_blank

        for i, q in enumerate(queries):
            if not isinstance(q, str) or is_blank(q):  # the batch job's rule (zero-width, BOM, NUL: blank too)
                where = f" (query {i + 1})" if len(queries) > 1 else ""
                raise PipelineError(f"empty query{where}: give some text to search for")
        return self.embedder.embed_texts(list(queries))

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (nq, k), positions int64 (nq, k))``; larger scores are closer; -1 = no result."""
        self.follow_live_version()
        dist, pos = filtered_search(self.index, vectors, k, self.info.get("search_params"), self.filter)
        return (dist if self.metric == "ip" else -dist), pos

    def search(self, queries: Sequence[str], k: int = 10, *, reranker=None, rerank_top: int = 100,
               with_text: bool = True, query_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Search each query; see the module docstring for the result shape.

        Args:
            queries: query texts.
            k: results per query.
            reranker: a ``pipeline.rerank.Reranker``; the top ``rerank_top`` are re-scored, the best k returned.
            rerank_top: candidates handed to the reranker.
            with_text: read the texts of the results (always done when reranking).
            query_ids: ids echoed as ``query_id``.

        Raises:
            PipelineError: empty query, ``k`` < 1, or a candidate's text cannot be read for the reranker.
        """
        if k < 1:
            raise PipelineError(f"-k: {k} must be at least 1")
        depth = max(k, rerank_top) if reranker is not None else k
        scores, positions = self.search_vectors(self.embed(queries), depth)
        out = []
        for qi, query in enumerate(queries):
            valid = positions[qi] >= 0
            pos, sc = positions[qi][valid], scores[qi][valid]
            rows = self.ids.take(pos)
            ids = rows.column("id").to_pylist()
            texts, fields = self.texts.lookup(rows) if (with_text or reranker is not None) else (
                [None] * len(ids), [{} for _ in ids])
            results = [{"id": ids[i], "score": float(sc[i]), "text": texts[i], **({"fields": fields[i]}
                                                                                  if fields[i] else {})}
                       for i in range(len(ids))]
            if reranker is not None:
                results = self._rerank(reranker, query, results, k)
            else:
                results = results[:k]
            entry: dict[str, Any] = {"query": query, "results": results}
            if query_ids is not None:
                entry = {"query_id": query_ids[qi], **entry}
            out.append(entry)
        return out

    @staticmethod
    def _rerank(reranker, query: str, results: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
        missing = [r["id"] for r in results if r["text"] is None]
        if missing:
            raise PipelineError(f"cannot rerank: the text of {missing[0]!r} cannot be read from the inputs")
        rr = reranker.score(query, [r["text"] for r in results])
        order = np.argsort(-rr, kind="stable")  # ties keep the first-stage order
        return [{**results[i], "rerank_score": float(rr[i])} for i in order[:k]]


def read_queries(path: str | Path) -> tuple[list[str], list[str] | None]:
    """Queries from a JSONL or Parquet file: field ``text`` (or ``query``), optional ``_id``/``id``.

    Returns:
        ``(texts, ids or None)``.

    Raises:
        PipelineError: unreadable file, a line that is not a JSON object, or no text field.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: no such file")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        names = table.column_names
        text_field = "text" if "text" in names else "query" if "query" in names else None
        if text_field is None:
            raise PipelineError(f"{path}: no 'text' or 'query' column (columns: {', '.join(names)})")
        id_field = "_id" if "_id" in names else "id" if "id" in names else None
        texts = [str(t) if t is not None else "" for t in table.column(text_field).to_pylist()]
        ids = [str(i) for i in table.column(id_field).to_pylist()] if id_field else None
        return texts, ids
    texts, ids = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}: line {lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise PipelineError(f"{path}: line {lineno}: not a JSON object")
            text = obj.get("text", obj.get("query"))
            if not isinstance(text, str):
                raise PipelineError(f"{path}: line {lineno}: field 'text' (or 'query') is missing or not a string")
            texts.append(text)
            qid = obj.get("_id", obj.get("id"))
            ids.append(str(qid) if qid is not None else str(lineno))
    return texts, ids


def search_file(searcher: Searcher, path: str | Path, k: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Results for every query of a JSONL/Parquet file, in batches (see ``read_queries``)."""
    texts, ids = read_queries(path)
    for i, q in enumerate(texts):
        if not q.strip():
            raise PipelineError(f"{path}: query {i + 1}{f' ({ids[i]})' if ids else ''} is empty")
    for start in range(0, len(texts), QUERY_BATCH):
        batch = texts[start : start + QUERY_BATCH]
        batch_ids = ids[start : start + QUERY_BATCH] if ids else None
        yield from searcher.search(batch, k, query_ids=batch_ids, **kwargs)
