"""The manifest (``OUTPUT/manifest.json``): the plan of a run, its shards and their work tables.

A plan builds on the live version ``base`` and commits version ``target``. Its shards: ``embed`` (rows of one
input file), ``rewrite`` (a part written again without its lost rows), ``dup`` (rows whose text another shard
embeds, copied once the embed shards are done). Each shard's work table (``OUTPUT/plan/work/PLAN_ID/SSSSSS.parquet``)
lists its rows and where their vectors come from; ``target.parquet`` there is the corpus the plan makes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ManifestMismatch
from pipeline.job.diff import Target
from pipeline.job.readers import InputFile

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
WORK = "plan/work"

# work-table kinds of an embed shard's rows: embedded here (the first row of its text), embedded here under another
# row of the same text, copied from a placed part, copied by the shard's dup shard
EMBED, SAME, REUSE, DUP = 0, 1, 2, 3


@dataclass(frozen=True)
class Shard:
    """One unit of work and of resume.

    ``embed``: rows ``[row_start, row_end)`` of input file ``file`` (the rows to write are listed in its work
    table). ``rewrite``: part ``source`` written again without its lost rows. ``dup``: the rows of embed shard
    ``source`` whose text another embed shard embeds, copied once every embed shard is done.
    """

    id: int
    file: int
    row_start: int
    row_end: int
    byte_start: int = 0
    kind: str = "embed"
    docs: int = 0  # documents the shard writes
    source: int = -1  # rewrite: the part it rewrites; dup: the embed shard whose rows it copies
    rows: int = 0  # embed: the rows it reads (its documents, and those a dup shard copies)

    @property
    def name(self) -> str:
        return f"{self.id:06d}"


@dataclass
class PlannedFile:
    """An input file of the plan: its identity plus what the scan found."""

    file: InputFile
    rows: int
    generated_ids: bool
    rejected: int = 0
    docs: int = 0  # rows kept in the corpus (valid, not duplicates)


@dataclass
class Manifest:
    fingerprint: str
    settings: dict[str, Any]
    plan: dict[str, Any]
    plan_id: str = ""
    base: int = 0  # the live version this plan builds on (0: none)
    target: int = 1  # the version it commits
    committed: bool = False
    files: list[PlannedFile] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    kept_parts: list[int] = field(default_factory=list)  # placed parts linked into the new version as they are
    next_id: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    created_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION, "fingerprint": self.fingerprint, "settings": self.settings,
            "plan": self.plan, "plan_id": self.plan_id, "base": self.base, "target": self.target,
            "committed": self.committed, "next_id": self.next_id, "counts": self.counts,
            "created_at": self.created_at, "kept_parts": self.kept_parts,
            "files": [{**asdict(pf.file), "rows": pf.rows, "generated_ids": pf.generated_ids,
                       "rejected": pf.rejected, "docs": pf.docs} for pf in self.files],
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        files = []
        for entry in data["files"]:
            entry = dict(entry)
            rows, gen = entry.pop("rows"), entry.pop("generated_ids")
            rejected, docs = entry.pop("rejected", 0), entry.pop("docs", 0)
            entry["stat"] = tuple(entry.get("stat", ()))
            files.append(PlannedFile(InputFile(**entry), rows, gen, rejected, docs))
        return cls(data["fingerprint"], data["settings"], data["plan"], data["plan_id"], data["base"],
                   data["target"], data["committed"], files, [Shard(**s) for s in data["shards"]],
                   list(data.get("kept_parts", [])), data["next_id"], data.get("counts", {}),
                   data.get("created_at", 0.0))

    @property
    def total_rows(self) -> int:
        """Documents the plan's shards write (embedded, copied or rewritten)."""
        return sum(s.docs for s in self.shards)

    def shard_rows(self, shard: Shard) -> int:
        """Rows an embed shard reads (its documents and those copied for it later); documents written otherwise."""
        return shard.rows if shard.kind == "embed" else shard.docs

    @property
    def embed_shards(self) -> list[Shard]:
        return [s for s in self.shards if s.kind == "embed"]

    @property
    def corpus_docs(self) -> int:
        """Documents of the corpus this plan makes (the target version's size)."""
        return sum(pf.docs for pf in self.files)

    def work_dir(self, out: Path) -> Path:
        return out / WORK / self.plan_id


def load_manifest(output: str | Path) -> Manifest | None:
    path = Path(output) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestMismatch(f"{path}: unreadable manifest ({exc}); start over with --overwrite") from exc
    if data.get("version") != MANIFEST_VERSION:
        raise ManifestMismatch(f"{path}: written by an older embed-corpus (manifest version {data.get('version')}, "
                               f"this one reads {MANIFEST_VERSION}): start over with --overwrite")
    return Manifest.from_json(data)


def load_target(work: Path) -> Target:
    t = pq.read_table(work / "target.parquet")
    c = {n: t.column(n).to_numpy() for n in t.column_names}
    return Target(c["file"], c["frow"], np.stack([c["h1"], c["h2"]], 1), np.stack([c["k1"], c["k2"]], 1), c["x"],
                  np.zeros(len(c["frow"]), np.int64))



def read_work(out: Path, manifest: Manifest, shard: Shard) -> pa.Table:
    """The work table of a shard (see ``plan._cut_embed_shards`` and ``plan._rewrites``)."""
    return pq.read_table(manifest.work_dir(out) / f"{shard.id:06d}.parquet")
