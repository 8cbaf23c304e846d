"""Command line: ``embed-corpus index build|update``, ``embed-corpus search``, ``embed-corpus eval``.

Thin: parse, call ``pipeline.index`` (store, search, evaluate), print. Errors the user can act
on are printed as one ``error: ...`` line with exit code 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from pipeline.cli.common import fail as _fail
from pipeline.errors import PipelineError


def _quiet_model_loading() -> None:
    """No weight-loading progress bars on stderr: search and eval print results, not model loading."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _recall_line(info: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in info.get("search_params", {}).items()) or "exact"
    tuning = info["tuning"]
    queries = info.get("recall_queries") or {}
    sets = (f"tuned on {queries.get('tune', 0):,} held-out corpus vectors, reported on another "
            f"{queries.get('report', 0):,}" if isinstance(queries, dict) else "")
    return (f"recall@1/10/100 {info['recall@1']:.3f}/{info['recall@10']:.3f}/{info['recall@100']:.3f} "
            f"at {params} (target recall@{tuning.get('k', 10)} {tuning['target']}"
            f"{'' if tuning['reached'] else ', NOT reached'}{'; ' + sets if sets else ''})")


def _query_side_line(info: dict[str, Any]) -> str | None:
    side = info.get("query_side")
    if not isinstance(side, dict):
        return None
    if "skipped" in side:
        return f"query-side recall not measured: {side['skipped']}"
    return (f"query-side recall@10/100 {side['recall@10']:.3f}/{side['recall@100']:.3f} ({side['queries']:,} corpus "
            f"texts cut to {side['text_chars']} characters, embedded as queries with the job's query prompt)")


def _summary(info: dict[str, Any]) -> str:
    from pipeline.index.choice import format_size

    where = " (lists on disk)" if info.get("on_disk") else ""
    seconds = info.get("build_seconds", info.get("update_seconds", 0.0))
    return (f"built {info['factory']}{where}: {info['live']:,} vectors of {info['dims']} dims, {_recall_line(info)}, "
            f"{format_size(info['size_bytes'])} on disk, {seconds:.1f}s")


@click.group()
def index() -> None:
    """Build or extend the FAISS index of an output directory (OUTPUT/index/)."""


@index.command("build")
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("--factory", default=None, help="faiss index_factory string (default: chosen from the budget).")
@click.option("--max-memory", default="4G", show_default=True,
              help="Memory budget of each process: the index (without on-disk lists), its training sample and the "
                   "add buffers.")
@click.option("--lists", type=click.Choice(["auto", "memory", "disk"]), default="auto", show_default=True,
              help="Where an IVF index keeps its inverted lists: auto puts them in a memory-mapped file when their "
                   "codes do not fit --max-memory.")
@click.option("--metric", type=click.Choice(["ip", "l2"]), default="ip", show_default=True,
              help="ip: inner product (cosine on normalised vectors); l2: Euclidean. A rebuild keeps the existing "
                   "index's unless given (as it keeps --target-recall and --recall-k).")
@click.option("--target-recall", type=float, default=0.95, show_default=True,
              help="Recall at --recall-k that nprobe/efSearch is tuned to reach.")
@click.option("--recall-k", type=click.Choice(["1", "10", "100"]), default="10", show_default=True,
              help="The k of --target-recall: the deepest k your searches ask for (recall@10 and @100 are both "
                   "reported).")
@click.option("--gpu/--no-gpu", default=False, show_default=True, help="Train (and add) on the GPU (faiss-gpu).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes adding pieces at once on this machine.")
@click.option("--pieces", type=int, default=None,
              help="Add the vectors in N pieces (default: --workers), each a disjoint run of parts, merged at the "
                   "end; IVF and flat indexes.")
@click.option("--piece", type=int, default=None,
              help="Build only piece K (0-based) of --pieces N, training first if no other process has (one Slurm "
                   "array task each); then --merge.")
@click.option("--merge", is_flag=True, help="Merge the pieces of --pieces N (all built) and swap the index in.")
@click.option("--query-side-queries", "query_side", type=int, default=None,
              help="Corpus texts embedded as queries to measure query-side recall (default: 1000 when the job "
                   "recorded a query instruction or prompt, else none; 0: skip).")
@click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Take the options of this job file's `index:` block (flags given here win): a rebuild keeps "
                   "the factory, metric and recall target the job's runs use.")
@click.option("--json", "as_json", is_flag=True, help="Print info.json instead of a summary.")
@click.pass_context
def build(ctx: click.Context, output: str, factory: str | None, max_memory: str, lists: str, metric: str,
          target_recall: float, recall_k: str, gpu: bool, workers: int, pieces: int | None, piece: int | None,
          merge: bool, query_side: int | None, job_file: str | None, as_json: bool) -> None:
    """Build the index of OUTPUT from its finished vector parts; the old index stays usable until the swap."""
    from pipeline.index.choice import format_size
    from pipeline.index.files import read_info
    from pipeline.index.store import build_index, choice_for

    opts: dict[str, Any] = {"factory": factory, "max_memory": max_memory, "lists": lists, "metric": metric,
                            "target_recall": target_recall, "recall_k": int(recall_k), "gpu": gpu,
                            "workers": workers, "pieces": pieces, "query_side": query_side}

    def unset(name: str) -> bool:
        return ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT

    try:  # a rebuild (the one `index update` advises, say) keeps what the index measures by, unless told otherwise
        old = read_info(output)
        opts.update({name: value for name, value in (("metric", old["metric"]),
                                                     ("target_recall", old["tuning"]["target"]),
                                                     ("recall_k", old["tuning"]["k"])) if unset(name)})
    except (PipelineError, KeyError, TypeError):  # no index yet (or an unreadable one, rebuilt from the defaults)
        pass
    if job_file is not None:  # the job's index options where no flag was given
        from pipeline.job.config import ConfigError, build_config

        try:
            given = build_config(job_file, {}).index or {}
        except ConfigError as exc:
            _fail(str(exc))
            return
        opts.update({name: value for name, value in given.items() if name in opts and unset(name)})
        opts["recall_k"] = int(opts["recall_k"])
    pieces = opts["pieces"]
    if (piece is not None or merge) and pieces is None:
        _fail("--piece and --merge need --pieces N (the number of pieces of the build)")
        return
    try:
        if piece is None and not merge and not as_json:
            choice = choice_for(output, factory=opts["factory"], max_memory=opts["max_memory"],
                                metric=opts["metric"], lists=opts["lists"])
            reason = choice.reason if choice.automatic or choice.on_disk else "as given (--factory)"
            click.echo(f"index: {choice.factory}{' (lists on disk)' if choice.on_disk else ''}: {reason}")
        info = build_index(output, **opts, piece=piece, merge=merge)
    except PipelineError as exc:
        _fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    if piece is not None:
        click.echo(f"piece {piece} of {pieces}: {info['rows']:,} vectors in {len(info['runs'])} runs, "
                   f"{info['seconds']:.1f}s, peak memory {format_size(info['peak_rss_bytes'])}")
        return
    if info.get("gpu_note"):
        click.echo(info["gpu_note"], err=True)
    click.echo(_summary(info))
    side = _query_side_line(info)
    if side:
        click.echo(side)
    click.echo(f"recorded in {output.rstrip('/')}/index/info.json")


@index.command("update")
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("--target-recall", type=float, default=None, help="Default: the target of the last build.")
@click.option("--recall-k", type=click.Choice(["1", "10", "100"]), default=None,
              help="The k of --target-recall (default: that of the last build).")
@click.option("--max-memory", default=None, help="Default: the budget of the last build.")
@click.option("--gpu/--no-gpu", default=False, show_default=True, help="Add on the GPU (faiss-gpu).")
@click.option("--query-side-queries", "query_side", type=int, default=None,
              help="Texts embedded as queries for query-side recall (default: as the last build; 0: skip).")
@click.option("--json", "as_json", is_flag=True, help="Print info.json instead of a summary.")
def update(output: str, target_recall: float | None, recall_k: str | None, max_memory: str | None, gpu: bool,
           query_side: int | None, as_json: bool) -> None:
    """Bring the index of OUTPUT up to date: add its new vector parts, remove vanished ones, re-measure recall, and
    say if a rebuild is due."""
    from pipeline.index.update import update_index

    try:
        info = update_index(output, target_recall=target_recall, recall_k=int(recall_k) if recall_k else None,
                            max_memory=max_memory, gpu=gpu, query_side=query_side)
    except PipelineError as exc:
        _fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    if info.get("built"):
        click.echo(f"no index yet: {_summary(info)}")
    elif info["added"] == 0 and not info["removed_parts"]:
        click.echo(f"index up to date: {info['live']:,} vectors from {len(info['parts'])} parts")
    else:
        removed = f", removed {len(info['removed_parts'])} vanished parts" if info["removed_parts"] else ""
        click.echo(f"added {info['added']:,} vectors from {len(info['added_parts'])} new parts{removed}: "
                   f"{info['live']:,} in all, {_recall_line(info)}")
    side = _query_side_line(info) if info.get("added") or info.get("removed_parts") else None
    if side:
        click.echo(side)
    for reason in info.get("rebuild_reasons", []):
        click.echo(f"rebuild due: {reason} (run `embed-corpus index build {output}`)", err=True)


def _print_human(entry: dict[str, Any]) -> None:
    click.echo(f"query: {entry['query']}")
    for rank, r in enumerate(entry["results"], 1):
        text = (r.get("text") or "").replace("\n", " ")
        text = text if len(text) <= 100 else text[:97] + "..."
        rr = f"  rerank {r['rerank_score']:.4f}" if "rerank_score" in r else ""
        click.echo(f"{rank:>3}. {r['score']:.4f}{rr}  {r['id']}  {text}")


@click.command("search")
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.argument("text", required=False)
@click.option("-k", "--top-k", "k", type=int, default=10, show_default=True, help="Results per query.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per query: {query, results: [{id, score, text}]}.")
@click.option("--queries", "queries_file", type=click.Path(dir_okay=False), default=None,
              help="JSONL or Parquet file of queries (field text or query, optional _id/id); results as JSONL.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="With --queries: write the JSONL here (default: stdout).")
@click.option("--rerank-model", default=None, help="Re-score the candidates with this reranker (Qwen3-Reranker or "
              "a cross-encoder).")
@click.option("--rerank-top", type=int, default=100, show_default=True, help="Candidates given to the reranker.")
@click.option("--rerank-instruction", default=None, help="Qwen3-Reranker task instruction.")
@click.option("--model", default=None, help="Refuse to run unless this is the job's model (a safety check).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the job's model folder to run its own Python code (never taken from OUTPUT/job.json).")
def search(output: str, text: str | None, k: int, as_json: bool, queries_file: str | None, out_file: str | None,
           rerank_model: str | None, rerank_top: int, rerank_instruction: str | None, model: str | None,
           device: str | None, trust_remote_code: bool) -> None:
    """Search the index of OUTPUT for TEXT, embedded as the job embeds queries.

    With --queries FILE, search every query of the file. With neither TEXT nor --queries, read queries from
    stdin, one per line, and answer each as it arrives: the model is loaded once (blank lines are skipped;
    end with Ctrl-D).
    """
    if text is not None and queries_file is not None:
        _fail("give either a query TEXT or --queries FILE, not both")
        return
    if text is not None and not text.strip():
        _fail("empty query: give some text to search for")
        return
    if k < 1 or rerank_top < 1:
        _fail("-k and --rerank-top must be at least 1")
        return
    if out_file is not None and queries_file is None:
        _fail("--out goes with --queries FILE")
        return
    from pipeline.index.search import Searcher

    stdin = sys.stdin if text is None and queries_file is None else None
    prompt = stdin is not None and stdin.isatty()
    if prompt:
        click.echo(f"loading the query model of {output} ...", err=True)
    _quiet_model_loading()
    try:
        searcher = Searcher(output, model=model, device=device, trust_remote_code=trust_remote_code)
        reranker = None
        if rerank_model:
            from pipeline.model.rerank import load_reranker

            reranker = load_reranker(rerank_model, device=device, instruction=rerank_instruction)
        kwargs = {"reranker": reranker, "rerank_top": rerank_top}
        if queries_file is not None:
            _search_file(searcher, queries_file, out_file, k, kwargs)
        elif stdin is not None:
            count = _search_lines(searcher, stdin, k, as_json, prompt, kwargs)
            if count == 0 and not prompt:  # at a terminal, Ctrl-D at once is just leaving
                _fail("no queries: give a query TEXT, --queries FILE, or queries on stdin, one per line")
        else:
            _print_entry(searcher.search([text], k, **kwargs)[0], as_json)
    except PipelineError as exc:
        _fail(str(exc))


def _print_entry(entry: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(entry, ensure_ascii=False))
    else:
        _print_human(entry)


def _search_file(searcher, queries_file: str, out_file: str | None, k: int, kwargs: dict[str, Any]) -> None:
    from pipeline.index.search import search_file

    sink = open(out_file, "w", encoding="utf-8") if out_file else None  # noqa: SIM115 - closed below
    try:
        count = 0
        for entry in search_file(searcher, queries_file, k, **kwargs):
            line = json.dumps(entry, ensure_ascii=False)
            if sink:
                sink.write(line + "\n")
            else:
                click.echo(line)
            count += 1
    finally:
        if sink:
            sink.close()
    if out_file:
        click.echo(f"{count} queries searched; results in {out_file}", err=True)


def _search_lines(searcher, stdin, k: int, as_json: bool, prompt: bool, kwargs: dict[str, Any]) -> int:
    """Answer each line of ``stdin`` as it arrives (click.echo flushes); returns the number of queries."""
    if prompt:
        click.echo("one query per line; Ctrl-D ends", err=True)
    count = 0
    while True:
        if prompt:
            click.echo("query> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            break
        query = line.rstrip("\r\n")
        if not query.strip():
            continue
        _print_entry(searcher.search([query], k, **kwargs)[0], as_json)
        count += 1
    if prompt:
        click.echo("", err=True)
    return count


@click.command("eval")
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.option("--queries", required=True, type=click.Path(dir_okay=False), help="BEIR queries.jsonl.")
@click.option("--qrels", required=True, type=click.Path(), help="BEIR qrels TSV, or the qrels/ folder.")
@click.option("--split", default="test", show_default=True, help="qrels split when --qrels is a folder.")
@click.option("--rerank-model", default=None, help="Add a column: the index's candidates re-scored by this model.")
@click.option("--rerank-top", type=int, default=100, show_default=True, help="Candidates given to the reranker.")
@click.option("--rerank-instruction", default=None, help="Qwen3-Reranker task instruction.")
@click.option("--ignore-identical-ids", is_flag=True, help="Drop results whose id equals the query id (BEIR option).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow the job's model folder to run its own Python code (never taken from OUTPUT/job.json).")
def eval_cmd(output: str, queries: str, qrels: str, split: str, rerank_model: str | None, rerank_top: int,
             rerank_instruction: str | None, ignore_identical_ids: bool, device: str | None, as_json: bool,
             trust_remote_code: bool) -> None:
    """nDCG@10, Recall@10/100 and MRR@10 of exact search and of the index of OUTPUT (BEIR layout)."""
    from pipeline.index.evaluate import format_table, run_eval

    _quiet_model_loading()
    try:
        report = run_eval(output, queries, qrels, split=split, rerank_model=rerank_model, rerank_top=rerank_top,
                          rerank_instruction=rerank_instruction, device=device,
                          ignore_identical_ids=ignore_identical_ids, trust_remote_code=trust_remote_code)
    except PipelineError as exc:
        _fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(format_table(report))
    click.echo(f"report: {report['path']}")
