"""Plan: compare the current input with what the output holds, and list the work that makes them equal.

Every run plans under ``OUTPUT/.plan.lock``:

1. each input file is identified by the digest of its whole content (``scan.identify``) and scanned once per
   content (``scan.scan``: every row validated, ids, texts and kept values hashed);
2. the *target* is built: every valid row, each id kept at its first occurrence in input order (the rest are
   duplicates: an error, or rejected with ``--on-bad-record skip``);
3. the target is matched against the *placements*, the documents already in part files (``diff.diff``): the live
   version's, plus those a replaced unfinished plan had finished;
4. the work is cut into shards: ``embed`` shards (row ranges of one input file, the rows that need a vector:
   embedded once per distinct text, or copied from a part that holds the same text) and ``rewrite`` shards (a part
   that keeps some rows and loses others is written again without the lost ones).

The plan is ``OUTPUT/manifest.json`` (files, shards, counts, the version it builds on and the one it makes) plus
one work table per shard in ``OUTPUT/plan/work/PLAN_ID/``. A rerun over the same input resumes the plan; a rerun
over changed input plans again on top of what is placed (finished shards of the old plan count as placed).
Settings that change vectors are fixed once a vector has been written: a rerun with others is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, ManifestMismatch, PipelineError, where
from pipeline.job import passes, versions
from pipeline.job.buckets import Scratch, Spill, bucket_bits, remove_stale_spills
from pipeline.job.config import JobConfig, fingerprint_fields
from pipeline.job.launch import expected_workers
from pipeline.job.manifest import (
    DUP,
    MANIFEST,
    WORK,
    Manifest,
    PlannedFile,
    Shard,
    load_manifest,
)
from pipeline.job.readers import InputFile, expand_inputs
from pipeline.job.records import FieldSpec, Reject, check_fields, iter_raw
from pipeline.job.scan import (
    FileScan,
    generated_id_hashes,
    identify,
    load_lines,
    remove_unused_scans,
    scan,
    scan_meta,
)
from pipeline.util import fault_point, locked, write_json_atomic

log = logging.getLogger(__name__)

SHARD_SECONDS = 60  # automatic shard size: about a minute of work on the device
TAPER_MIN = 32  # the last automatic shards shrink to no less than 1/TAPER_MIN of a shard (~2 s of work)
# A short shard may end inside a Parquet row group of up to this many times its own work: the shards sharing the
# group each read all of it, and reading is ~100x cheaper than embedding the same bytes. Row groups of ~1,000
# documents are ~6 s of 4B work on an H200: whole, they kept the two workers' last shards ~3 s apart.
ROW_GROUP_SPLIT = 8
TRASH = ".trash"



def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


LEFTOVERS = ("vectors", "versions", "parts", "shards", "plan", "rejects", "job.json", "index", "canary")
# The next shard/part id any plan of this output may use; kept through --overwrite and through plans dropped for
# new settings, whose workers may still be writing: an id used twice let such a worker's part or marker stand for
# the new plan's shard of that id (its vectors committed under the new settings, exit 0).
ID_FLOOR = ".next-id"


def _id_floor(out: Path) -> int:
    """The smallest id no plan of ``out`` has used: from ``ID_FLOOR`` and the ids of claims, markers and parts."""
    floor = versions.max_part_id(out) + 1
    try:
        floor = max(floor, int((out / ID_FLOOR).read_text()))
    except (OSError, ValueError):
        pass
    folder = out / "shards"
    for path in folder.iterdir() if folder.is_dir() else []:
        head = path.name.lstrip(".").split(".")[0]
        if head.isdigit():
            floor = max(floor, int(head) + 1)
    return floor


def discard_output(out: Path) -> None:
    """``--overwrite``: move the old output aside (its manifest first), then delete it.

    Without its manifest an output counts as discarded: a kill at any moment of this leaves either the old output
    whole, or an output without manifest whose leftovers the next run removes (``_remove_leftovers``).
    """
    trash = out / TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    if (out / MANIFEST).exists():
        os.rename(out / MANIFEST, trash / MANIFEST)
        log.warning("--overwrite: discarding the existing output in %s", out)
    for entry in sorted(out.iterdir()):
        if entry.name in (TRASH, ".plan.lock", ".claims.lock", "logs", ID_FLOOR):
            continue
        os.rename(entry, trash / entry.name)
        fault_point("overwrite-moving")
    shutil.rmtree(trash, ignore_errors=True)


# Names an output folder may hold before its first plan (its logs, lock files: .plan.lock, nightly.sh's
# .nightly.lock), or that say it is one (a plan writes ID_FLOOR first).
MARKS = (MANIFEST, ID_FLOOR, "job.json", TRASH)


def _neutral(name: str) -> bool:
    return name == "logs" or (name.startswith(".") and name.endswith(".lock"))


def check_own_folder(out: Path) -> None:
    """Refuse an existing folder that holds anything but an embed-corpus output: ``--overwrite`` would delete its
    files, and a run would take its ``plan/`` or ``versions/`` folders for an interrupted discard's leftovers."""
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names or any(name in MARKS for name in names):
        return
    foreign = [name for name in names if not _neutral(name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PipelineError(f"output {out}: the folder holds files that are not an embed-corpus output ({shown}); "
                            "give a new or empty folder (nothing was changed)")


def _remove_leftovers(out: Path) -> None:
    """An output folder without a manifest holds nothing valid: remove what an interrupted discard left."""
    found = [name for name in LEFTOVERS if (out / name).exists() or (out / name).is_symlink()]
    if not found:
        return
    log.warning("%s has no manifest.json but holds %s (left by a run stopped or failed before its plan was "
                "written, or by an --overwrite): removing them", out, ", ".join(found))
    for name in found:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


def prepare(cfg: JobConfig, *, overwrite: bool = False, dry_run: bool = False) -> Manifest:
    """The plan of ``cfg.output`` for the current input: resumed when nothing changed, made (and written, unless
    ``dry_run``) otherwise.

    Raises:
        InputError: bad input (with ``on_bad_record: error``), naming file, row and field; an empty corpus.
        ManifestMismatch: the output holds vectors made with other settings.
    """
    out = Path(cfg.output)
    check_own_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / ".plan.lock"):
        check_own_folder(out)
        shutil.rmtree(out / TRASH, ignore_errors=True)  # left by an --overwrite that was killed
        remove_stale_spills(out)
        floor = _id_floor(out)  # before --overwrite moves the old plan's claims and parts away
        if not (out / ID_FLOOR).exists():  # --plan-only too: it caches its scans under plan/
            _write_floor(out, floor)  # marks the folder as an output before anything else is written to it
        if overwrite and not dry_run:
            prior = load_manifest(out)
            floor = max(floor, prior.next_id if prior else 0)
            discard_output(out)
        old = load_manifest(out)
        if old is None and not dry_run:
            _remove_leftovers(out)
        settings = {name: _plain(getattr(cfg, name)) for name in fingerprint_fields()}
        if old is not None and old.fingerprint != cfg.fingerprint() and has_vectors(out):
            _refuse_settings(out, old, settings, cfg)
        if old is not None and old.fingerprint != cfg.fingerprint():
            log.warning("%s: no vector was written with the earlier settings; planning with the new ones", out)
            floor, old = max(floor, old.next_id), None
        if old is not None and not old.committed and versions.live_version(out) == old.target:
            old.committed = True  # killed between the switch and the manifest update: the switch is the commit
            write_json_atomic(out / MANIFEST, old.to_json())
        known = {pf.file.path: pf.file for pf in old.files} if old else {}
        planned_at = old.created_at if old else 0.0
        infos = [identify(path, root, known, planned_at)
                 for path, root in expand_inputs(cfg.input, taken=set(known), output=out)]
        if old is not None and _same_inputs(old, infos):
            return old  # resume the plan (or nothing new since the last commit)
        manifest = make_plan(out, cfg, settings, infos, old, dry_run=dry_run, id_floor=floor)
        if not dry_run:
            _write_floor(out, manifest.next_id)
            write_json_atomic(out / MANIFEST, manifest.to_json())
            fault_point("after-plan-write")
            _clean_after_replan(out, manifest, old)
        return manifest


def _write_floor(out: Path, next_id: int) -> None:
    tmp = out / f"{ID_FLOOR}.tmp-{os.getpid()}"
    tmp.write_text(str(next_id))
    os.replace(tmp, out / ID_FLOOR)


def has_vectors(out: Path) -> bool:
    """Whether any vector was written to ``out`` (a committed version or a finished shard)."""
    if versions.live_version(out):
        return True
    folder = out / "shards"
    return folder.is_dir() and any(folder.glob("*.done.json"))


def _refuse_settings(out: Path, old: Manifest, settings: dict[str, Any], cfg: JobConfig) -> None:
    recorded = _effective_settings(out, old.settings)
    changed = [k for k in settings if old.settings.get(k) != settings[k]]
    detail = ", ".join(f"{k}: {recorded.get(k)!r} -> {settings[k]!r}" for k in changed)
    raise ManifestMismatch(
        f"{out} was built with other settings ({detail}). Its vectors would not be comparable with new ones: "
        f"write to a new --output, or add --overwrite to discard {out} and start over."
    )


def _effective_settings(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Recorded settings with the values the model resolved (``max_length: None`` is the model's limit)."""
    try:
        model = json.loads((out / "job.json").read_text()).get("model", {})
    except (OSError, ValueError):
        return settings
    resolved = dict(settings)
    for name in ("max_length", "dims", "pooling"):
        if resolved.get(name) in (None, "auto") and name in model:
            resolved[name] = model[name]
    return resolved


def _same_inputs(old: Manifest, infos: list[InputFile]) -> bool:
    """Whether the plan's files are these, by path, content and key (the key is in generated ids: the same files
    under another ``--input`` root get other ids)."""
    return ([(pf.file.path, pf.file.key, pf.file.digest) for pf in old.files]
            == [(i.path, i.key, i.digest) for i in infos])


# --------------------------------------------------------------------------------------------- the plan


def make_plan(out: Path, cfg: JobConfig, settings: dict[str, Any], infos: list[InputFile],
              old: Manifest | None, *, dry_run: bool = False, id_floor: int = 0) -> Manifest:
    """Scan, spill the target and the placements into buckets, run the passes (``job.passes``), cut shards; write
    the work tables (``dry_run``: into a temporary folder that is removed, and no rejects file)."""
    spec = FieldSpec.of(cfg)
    infos = _check_new_files(infos, old, spec)
    scans: list[FileScan] = []
    for info in infos:
        result = scan_meta(out, info, spec)
        if len(result.rejects) > 1 and len(result.rejects) >= result.valid + len(result.rejects) and not result.valid:
            # Not a few bad records but a wrong setting (as a missing Parquet column is): even `skip` stops.
            raise InputError(f"{result.rejects[0].message()}, and so is every other row of {info.path}: check "
                             "--text-field and --id-field")
        scans.append(result)
    remove_unused_scans(out, {i.digest for i in infos})
    rejects = [r for s in scans for r in s.rejects]
    _refuse_rejects(rejects, cfg)
    valid = sum(s.valid for s in scans)
    if not valid and not cfg.allow_empty:
        where_ = ", ".join(i.path for i in infos[:3]) + (" ..." if len(infos) > 3 else "")
        raise InputError(f"no documents in the input ({len(infos)} files: {where_}): check --input and "
                         "--text-field, or pass --allow-empty to accept an empty corpus")

    base = versions.live_version(out)
    pending = [s.id for s in old.shards if s.kind == "embed" and versions.part_complete(out, s.id)] \
        if old is not None and not old.committed else []
    bits = bucket_bits(max(valid, int(versions.version_info(out, base).get("docs", 0)) if base else 0))
    plan_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    next_id = max(old.next_id if old else 0, versions.max_part_id(out) + 1, id_floor)
    manifest = Manifest(cfg.fingerprint(), settings, {**cfg.plan_settings(), "shard_budget": None,
                                                      "bucket_bits": bits},
                        plan_id=plan_id, base=base, target=base + 1, committed=False, next_id=next_id,
                        created_at=time.time())
    work = Path(tempfile.mkdtemp(prefix="embed-corpus-plan-")) if dry_run else manifest.work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    budget, unit = _shard_budget(cfg)
    manifest.plan["shard_budget"] = {"value": budget, "unit": unit}
    try:
        with Scratch(out, bits) as scratch:
            rows = scratch.spill("rows", passes.ROWS_SCHEMA, "h1", bits)
            for i, info in enumerate(infos):
                _spill_file(rows, out, i, info, spec)
            rows.close()  # written once: at most two spills' writers open at a time
            placed = scratch.spill("placed", passes.PLACED_SCHEMA, "h1", bits)
            if base:
                versions.spill_version(placed, out, base)
            for part in pending:
                versions.spill_part(placed, out, part, live=False)
            placed.close()
            need = scratch.spill("need", passes.ROWS_SCHEMA, "k1", bits)
            keyed = scratch.spill("keyed", passes.KEYED_SCHEMA, "k1", bits)
            with pq.ParquetWriter(work / "target.parquet", passes.TARGET_SCHEMA) as writer:
                got = passes.by_id(rows, placed, need, keyed, writer, len(infos))
            fault_point("during-plan")
            if got.duplicates:
                rejects += _duplicate_rejects(infos, spec, got.duplicates)
                _refuse_rejects(rejects, cfg)
            group_bits = min(bits, 8)
            resolved = scratch.spill("resolved", passes.RESOLVED_SCHEMA, "file", group_bits)
            file_cost = np.zeros(len(infos), np.int64)
            passes.by_text(need, keyed, resolved, passes.file_group(len(infos), group_bits), got.counts, file_cost)
            taper = expected_workers(cfg) if unit == "bytes" else 0
            manifest.plan["shard_budget"]["taper_workers"] = taper
            if taper:
                log.info("shards of %d bytes of text, short at both ends of the plan for %d workers", budget, taper)
            _cut_embed_shards(manifest, work, out, infos, scans, resolved, budget, unit, file_cost, taper)
        _rewrites(manifest, work, got)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if dry_run:
            shutil.rmtree(work, ignore_errors=True)
    manifest.files = [PlannedFile(info, s.rows, s.generated_ids, len([r for r in rejects if r.file == info.path]),
                                  int(got.docs_per_file[i])) for i, (info, s) in enumerate(zip(infos, scans,
                                                                                              strict=True))]
    if not dry_run:
        _write_rejects(out, manifest, rejects)
    manifest.counts = {**got.counts, "rejected": len(rejects), "pending_parts": len(pending)}
    return manifest


def _refuse_rejects(rejects: list[Reject], cfg: JobConfig) -> None:
    if rejects and cfg.on_bad_record == "error":
        rejects.sort(key=lambda r: (r.file, r.row))
        more = f" (and {len(rejects) - 1} more bad rows)" if len(rejects) > 1 else ""
        raise InputError(f"{rejects[0].message()}{more}. Fix the input, or run with --on-bad-record skip to record "
                         "bad rows in OUTPUT/rejects/ and embed the rest.")


def _spill_file(rows: Spill, out: Path, i: int, info: InputFile, spec: FieldSpec) -> None:
    """The valid rows of input file ``i`` into the id buckets (its scan read from the cache, then let go)."""
    s, _cached = scan(out, info, spec)
    h = generated_id_hashes(info, s.frow) if s.generated_ids else s.h
    rows.add({"file": np.full(s.valid, i, np.int32), "frow": s.frow, "h1": h[:, 0], "h2": h[:, 1],
              "k1": s.k[:, 0], "k2": s.k[:, 1], "x": s.x, "nbytes": s.nbytes})


def _check_new_files(infos: list[InputFile], old: Manifest | None, spec: FieldSpec) -> list[InputFile]:
    """What no single row can tell (``records.check_fields``: named fields exist, one id source and type, kept
    column types), decided for files whose content is new, against the files already planned."""
    known = {(pf.file.path, pf.file.digest): pf.file for pf in old.files} if old else {}
    # a content planned before under another path (renamed, moved, copied) keeps how it was read: its rows stay
    # in parts written with those types, and its cached scan hashed its kept values as them
    by_digest = {pf.file.digest: pf.file for pf in old.files} if old else {}
    settled, fresh = {}, []
    for i, info in enumerate(infos):
        prev = known.get((info.path, info.digest)) or by_digest.get(info.digest)
        if prev is not None and prev.ids:
            settled[i] = dataclasses.replace(info, ids=prev.ids, kept_schema=prev.kept_schema)
        else:
            fresh.append(i)
    checked = check_fields([infos[i] for i in fresh], list(settled.values()), spec) if fresh else []
    settled.update(zip(fresh, checked, strict=True))
    result = [settled[i] for i in range(len(infos))]
    keys: dict[str, str] = {}
    for info in result:
        if info.ids == "generated":
            other = keys.setdefault(info.key, info.path)
            if other != info.path:
                raise InputError(f"{other} and {info.path} have no {spec.id_field!r} field and the same name "
                                 f"{info.key!r}: their generated ids (NAME#ROW) would collide. Give them ids, or "
                                 "give their common folder as --input")
    return result


def _duplicate_rejects(infos: list[InputFile], spec: FieldSpec, found: list[tuple[np.ndarray, ...]]
                       ) -> list[Reject]:
    """Rejects of the rows whose id appeared earlier in input order (``found``: per bucket, the duplicate rows'
    files and rows and those of the first occurrence)."""
    dfile, drow, ffile, frow = (np.concatenate(cols) for cols in zip(*found, strict=True))
    wanted: dict[int, set[int]] = {}
    for f, r in zip(np.concatenate([dfile, ffile]).tolist(), np.concatenate([drow, frow]).tolist(), strict=True):
        wanted.setdefault(f, set()).add(r)
    ids = {f: _ids_at(infos[f], spec, sorted(rows)) for f, rows in wanted.items()}
    out = []
    for fd, rd, fo, ro in zip(dfile.tolist(), drow.tolist(), ffile.tolist(), frow.tolist(), strict=True):
        dup_id = ids[fd].get(rd)
        origin = infos[fo]
        out.append(Reject(infos[fd].path, infos[fd].format, rd, spec.id_field,
                          f"duplicate id {dup_id!r} (first at {origin.path}: {where(origin.format, ro)})", dup_id))
    return out


def _ids_at(info: InputFile, spec: FieldSpec, rows: list[int]) -> dict[int, str]:
    want = set(rows)
    found: dict[int, str] = {}
    id_spec = FieldSpec(spec.text_field, spec.id_field, ())
    for raw in iter_raw(info, id_spec, row_start=rows[0], row_end=rows[-1] + 1):
        if spec.id_field not in raw.table.column_names:
            continue
        for row, value in zip(raw.rows.to_pylist(), raw.table.column(spec.id_field).to_pylist(), strict=True):
            if row in want:
                found[row] = str(value)
    return found


def _shard_budget(cfg: JobConfig) -> tuple[int, str]:
    """Work per shard: ``--shard-size`` rows, else bytes of text for about ``SHARD_SECONDS`` on the device."""
    if cfg.shard_size:
        return int(cfg.shard_size), "rows"
    from pipeline.job.sizing import shard_bytes

    return shard_bytes(cfg, SHARD_SECONDS), "bytes"


def _cut_embed_shards(manifest: Manifest, work: Path, out: Path, infos: list[InputFile], scans: list[FileScan],
                      resolved: Spill, budget: int, unit: str, file_cost: np.ndarray, taper: int) -> None:
    """Embed shards over the rows that need a vector, file by file in input order; one work table per shard; then a
    dup shard for each embed shard with rows whose text another shard embeds. ``file_cost``: each file's work (see
    ``passes.shard_cost``); ``taper``: the workers expected (0: no taper; see ``_cut``)."""
    cut: dict[int, passes.FileShards] = {}
    dups: list[tuple[int, int]] = []
    before = np.cumsum(file_cost) - file_cost  # work of the files before each one
    after = np.cumsum(file_cost[::-1])[::-1] - file_cost  # and after it
    for f, rows in passes.files_in_order(resolved):
        frow = rows.column("frow").to_numpy()
        nbytes = rows.column("nbytes").to_numpy()
        kind = rows.column("kind").to_numpy()
        cost = passes.shard_cost(kind, nbytes) if unit == "bytes" else np.ones(len(frow), np.int64)
        # compressed JSONL and Arrow files are read from their start by every shard: no short pieces at their end
        seekable = infos[f].compression is None and infos[f].format != "arrow"
        pieces = _cut(frow, cost, budget, scans[f].row_groups, unit == "rows", before=int(before[f]),
                      after=int(after[f]) if seekable else 1 << 62, taper=taper)
        sids = np.arange(manifest.next_id, manifest.next_id + len(pieces))
        manifest.next_id += len(pieces)
        cut[f] = passes.FileShards(np.array([frow[p[0]] for p in pieces], np.int64), sids)
        lines = load_lines(out, infos[f])
        for sid, sel in zip(sids.tolist(), pieces, strict=True):
            table = passes.work_table(rows.take(pa.array(sel)), sid, cut)
            pq.write_table(table, work / f"{sid:06d}.parquet")
            k = table.column("kind").to_numpy()
            lo, hi = int(frow[sel[0]]), int(frow[sel[-1]]) + 1
            byte_start = int(lines[lo]) if lines is not None else 0
            manifest.shards.append(Shard(sid, f, lo, hi, byte_start, "embed", int((k != DUP).sum()), rows=len(sel)))
            dups.append((sid, int((k == DUP).sum())))
    for sid, n in dups:
        if n:  # the rows of shard `sid` whose text another shard embeds, copied once every embed shard is done
            manifest.shards.append(Shard(manifest.next_id, -1, 0, 0, 0, "dup", n, sid))
            manifest.next_id += 1


def _cut(frow: np.ndarray, cost: np.ndarray, budget: int, row_groups: list[int] | None, by_rows: bool, *,
         before: int = 0, after: int = 0, taper: int = 0) -> list[np.ndarray]:
    """Split needed rows (sorted by row) into consecutive pieces of about ``budget`` cost each.

    In Parquet files a full piece ends at a row-group edge where the row groups are smaller than a piece, so that
    a row group is read by one shard; in larger row groups a piece ends at twice the budget. A short piece (see
    ``taper``) ends inside a row group of up to ``ROW_GROUP_SPLIT`` times its target, else at the group's edge.

    With ``taper`` (the workers expected), the pieces are short at both ends of the plan (``before`` and
    ``after``: the cost of the files cut before and after this one), never below ``budget / TAPER_MIN``:

    - at the start, about the work cut so far / taper: a worker's first shard is read and tokenized before its
      GPU starts (a full shard of the 0.6B model, 27M tokens, took 10 s of that on an H200), the next ones
      while the GPU works;
    - at the end, the work left / (2 x taper): workers claim shards in plan order, so at the end each holds a
      short shard and they finish within seconds of each other, where full shards (a minute of work by
      default) would leave all but one waiting for up to that long.
    """
    if row_groups and by_rows and len(frow) == sum(row_groups) and len(frow) == frow[-1] + 1:
        # every row of the file, sized by rows: whole row groups, large ones split evenly
        bounds = _row_group_ranges(row_groups, budget)
        return [np.arange(a, b) for a, b, _ in bounds]
    pieces, start, acc = [], 0, 0
    edges = set(np.cumsum(row_groups).tolist()) if row_groups else set()
    total = np.cumsum(cost)
    # what reading a row's whole row group costs, in work units: all its rows are read, needed or not (in a
    # nightly run most are not), at the mean work of a needed row
    group_cost = np.zeros(len(frow))
    if row_groups and len(frow):
        group = np.searchsorted(np.cumsum(row_groups), frow, side="right")
        group_cost = np.append(np.asarray(row_groups, np.float64), 0.0)[group] * (float(total[-1]) / len(frow))
    end = int(total[-1]) + after if len(total) else after

    def target(start: int) -> int:
        if not taper:
            return budget
        done = before + (int(total[start - 1]) if start else 0)
        left = end - (int(total[start - 1]) if start else 0)
        return min(budget, max(budget // TAPER_MIN, min(done // taper, left // (2 * taper))))

    want = target(0)
    for i in range(len(frow)):
        acc = total[i] - (total[start - 1] if start else 0)
        at_edge = not edges or (int(frow[i]) + 1) in edges
        cheap = want < budget and group_cost[i] <= ROW_GROUP_SPLIT * want  # a short piece, a small row group
        if acc >= want and (at_edge or cheap or acc >= 2 * budget):
            pieces.append(np.arange(start, i + 1))
            start = i + 1
            want = target(start)
    if start < len(frow):
        pieces.append(np.arange(start, len(frow)))
    return pieces


def _row_group_ranges(groups: list[int], shard_size: int) -> list[tuple[int, int, int]]:
    """Shards of whole row groups (about ``shard_size`` rows); a larger row group is split into row ranges."""
    ranges: list[tuple[int, int, int]] = []
    start = pos = 0
    for n in groups:
        if n > shard_size:
            if pos > start:
                ranges.append((start, pos, 0))
            parts = -(-n // shard_size)
            step = -(-n // parts)
            ranges.extend((pos + i, min(pos + i + step, pos + n), 0) for i in range(0, n, step))
            pos += n
            start = pos
            continue
        if pos - start + n > shard_size and pos > start:
            ranges.append((start, pos, 0))
            start = pos
        pos += n
    if pos > start:
        ranges.append((start, pos, 0))
    return ranges


def _rewrites(manifest: Manifest, work: Path, got: passes.Outcome) -> None:
    """Parts that lose rows and keep others are rewritten (the work table lists the first rows of the documents
    that go); parts that keep everything are linked as they are; parts that keep nothing are dropped."""
    for part in sorted(set(got.staying) | set(got.leaving)):
        if part not in got.leaving:
            manifest.kept_parts.append(int(part))
            continue
        if not got.staying.get(part):
            continue  # dropped whole
        sid = manifest.next_id
        manifest.next_id += 1
        drop = got.leaving_rows(part)
        pq.write_table(pa.table({"drop_prow": drop}), work / f"{sid:06d}.parquet")
        manifest.shards.append(Shard(sid, -1, 0, 0, 0, "rewrite", int(got.staying[part]), int(part)))


def _write_rejects(out: Path, manifest: Manifest, rejects: list[Reject]) -> None:
    """``OUTPUT/rejects/FFFFF.jsonl``: the rows of each input file that are not embedded, with the reason."""
    folder = out / "rejects"
    shutil.rmtree(folder, ignore_errors=True)
    if not rejects:
        return
    folder.mkdir()
    index = {pf.file.path: i for i, pf in enumerate(manifest.files)}
    by_file: dict[str, list[Reject]] = {}
    for r in rejects:
        by_file.setdefault(r.file, []).append(r)
    for path, rows in by_file.items():
        with open(folder / f"{index[path]:05d}.jsonl", "w", encoding="utf-8") as f:
            for r in sorted(rows, key=lambda r: r.row):
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        log.warning("%s: %d bad rows skipped, listed in %s", path, len(rows), folder)


def _clean_after_replan(out: Path, new: Manifest, old: Manifest | None) -> None:
    """Markers and claims of shards that are no longer planned, and work tables of older plans, go."""
    ids = {s.id for s in new.shards}
    folder = out / "shards"
    if folder.is_dir():
        for path in folder.iterdir():
            head = path.name.split(".")[0]
            if head.isdigit() and int(head) not in ids and not path.name.endswith(".claim"):
                path.unlink(missing_ok=True)
    work = out / WORK
    if work.is_dir():
        for entry in work.iterdir():
            if entry.name != new.plan_id:
                shutil.rmtree(entry, ignore_errors=True)
