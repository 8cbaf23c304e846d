"""``embed-corpus serve``: the OpenAI-compatible server of a job's model (``pipeline.serve``)."""

from __future__ import annotations

import logging
import os
import sys

import click

from pipeline.errors import PipelineError
from pipeline.serve.app import create_app
from pipeline.serve.limits import DEFAULT_PORT, LOOPBACK, ServeOptions
from pipeline.serve.service import Service

log = logging.getLogger("pipeline.serve")


@click.command("serve")
@click.argument("output", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--model", default=None, help="Serve this model without a job (folder, pkg:PACKAGE/PATH or hub id).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (default: $EMBED_CORPUS_API_KEY).")
@click.option("--served-model-name", "served_names", multiple=True,
              help="Model name(s) clients send (default: the job's --model). Repeatable.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for the model (default: torch's; 1 is often fastest on a small shared machine).")
@click.option("--input-type", type=click.Choice(["query", "document"]), default="query", show_default=True,
              help="Framing of text input when a request does not say: the job's query or document prompt.")
@click.option("--instruction", default=None, help="Query instruction (default: the job's, else the model's).")
@click.option("--batch-tokens", type=int, default=16384, show_default=True, help="Token budget per forward pass.")
@click.option("--max-wait-ms", type=float, default=2.0, show_default=True,
              help="How long the model worker waits for more requests to batch with the first.")
@click.option("--max-batch", type=int, default=None, help="Sequences per forward pass (1: one text per forward).")
@click.option("--max-inputs", type=int, default=2048, show_default=True, help="Inputs per request.")
@click.option("--max-request-tokens", type=int, default=300_000, show_default=True, help="Tokens per request.")
@click.option("--max-queue", type=int, default=1024, show_default=True, help="Requests waiting; more get a 503.")
@click.option("--rerank-model", default=None, help="Reranker for /v1/rerank and /search (Qwen3-Reranker or a "
              "cross-encoder).")
@click.option("--rerank-instruction", default=None, help="Qwen3-Reranker task instruction.")
@click.option("--trust-remote-code", is_flag=True, default=False,
              help="Allow the model folder's own Python code (needed to serve a job made with it; never taken from "
              "OUTPUT/job.json alone).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True)
@click.option("--access-log/--no-access-log", default=False, show_default=True)
def serve(output: str | None, model: str | None, host: str, port: int, api_key: str | None,
          served_names: tuple[str, ...], device: str | None, threads: int | None, input_type: str,
          instruction: str | None, batch_tokens: int, max_wait_ms: float, max_batch: int | None, max_inputs: int,
          max_request_tokens: int, max_queue: int, rerank_model: str | None, rerank_instruction: str | None,
          trust_remote_code: bool, log_level: str, access_log: bool) -> None:
    """Serve OUTPUT's model (or --model M) over an OpenAI-compatible /v1/embeddings, with /search and /v1/rerank.

    Queries are embedded as the job recorded (model, prompt, dims, normalisation), so their vectors match OUTPUT's.
    """
    try:
        import uvicorn
    except ImportError:
        click.echo("error: serving needs the [serve] extra: pip install 'embed-corpus[serve]'", err=True)
        sys.exit(1)
    for name, value, low in (("--batch-tokens", batch_tokens, 1), ("--max-inputs", max_inputs, 1),
                             ("--max-request-tokens", max_request_tokens, 1), ("--max-queue", max_queue, 1),
                             ("--max-batch", max_batch or 1, 1), ("--max-wait-ms", max_wait_ms, 0),
                             ("--threads", threads or 1, 1)):
        if value < low:
            click.echo(f"error: {name} must be at least {low}", err=True)
            sys.exit(2)
    api_key = api_key or os.environ.get("EMBED_CORPUS_API_KEY") or None
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    options = ServeOptions(api_key=api_key, served_names=served_names, input_type=input_type, instruction=instruction,
                           batch_tokens=batch_tokens, max_wait_ms=max_wait_ms, max_batch=max_batch,
                           max_inputs=max_inputs, max_request_tokens=max_request_tokens, max_queue=max_queue,
                           rerank_instruction=rerank_instruction)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no weight-loading bars in a server's log
    except ImportError:  # pragma: no cover
        pass
    try:
        service = Service.load(output, model=model, device=device, options=options, rerank_model=rerank_model,
                               trust_remote_code=trust_remote_code)
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    logging.getLogger("pipeline").setLevel(log_level.upper())
    extras = [x for x, on in (("/search", service.searcher is not None), ("/v1/rerank", service.reranker is not None))
              if on]
    click.echo(f"serving {service.names[0]!r} ({service.info.dims} dims) on http://{host}:{port}/v1/embeddings"
               f"{' with ' + ', '.join(extras) if extras else ''}", err=True)
    service.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, access_log=access_log)
    finally:
        service.stop()
