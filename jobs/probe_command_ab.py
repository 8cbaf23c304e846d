"""Probe (GPU): the same `embed-corpus run` (random weights of SIZE, default shard sizing, warm compile cache
after the first run) from several copies of the package, in turn, ROUNDS times: each line one run, its steady
rate, start-up, each shard's model rate and the model's start-up steps; then the model alone in this process
(the bench's ``model_tokens_per_s``: the first 6,000 documents pre-tokenized, compiled forward, mean of passes
2-3), the denominator of each run's steady rate. An A/B of a change in one device call
(first used to ask whether tokenizing beside the model slows it: ``h200-probe-tokenize-beside-2026-12-01.txt``).

    python3 jobs/probe_command_ab.py SIZE TOKENIZER_DIR DOCS ROUNDS WORKDIR NAME=PACKAGE_PARENT [...]
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from pipeline.bench import command
from pipeline.bench.gpu import make_corpus, random_model
from pipeline.bench.synthetic import save_embedding_dir
from pipeline.model.encoder import Embedder

size, tokdir, n_docs, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
work = Path(sys.argv[5]).resolve()
variants = [spec.split("=", 1) for spec in sys.argv[6:]]
work.mkdir(parents=True, exist_ok=True)
tok = AutoTokenizer.from_pretrained(tokdir)
tok.model_max_length = 1 << 30
texts = make_corpus(tok, n_docs)
model = random_model(size, "cuda", "bfloat16")
model_dir = save_embedding_dir(model, work / "model", tokenizer_dir=tokdir)
torch.cuda.empty_cache()
src = work / "corpus.parquet"
pq.write_table(pa.table({"id": [f"d{i}" for i in range(n_docs)], "text": texts}), src, row_group_size=256)
for rnd in range(rounds):
    for name, parent in variants:
        out = work / f"run-{name}-{rnd}"
        env = command.command_env(compile_cache=work / "cache", devices="0")
        env["PYTHONPATH"] = str(Path(parent).resolve())
        ran = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], env=env, cwd=work,
                             capture_output=True, text=True).stdout.strip()
        if not Path(ran).is_relative_to(Path(parent).resolve()):
            raise SystemExit(f"{name}: the command imports {ran}, not the package under {parent}")
        # run in ``work`` (no package there): `python -m` puts the current folder first on the import path, so
        # in the checkout every variant would run the checkout's package, whatever PYTHONPATH says
        got = command.measure(command.run_args([src], out, model_dir), env, out, work / "logs" / f"{name}-{rnd}.log",
                              timeout=170, cwd=work)
        cols = {c: i for i, c in enumerate(got["shard_log"]["columns"])}
        shards = [(r[cols["rows"]], round(r[cols["tokens"]] / r[cols["model_s"]])) for r in got["shard_log"]["rows"]]
        print(json.dumps({"variant": name, "round": rnd, "steady": got["steady_tokens_per_s"],
                          "after_first": command.after_first_shard(got["shard_log"]),
                          "first_extra_s": command.first_shard_extra_s(got["shard_log"]),
                          "startup_s": got["startup_s"], "wall_s": got["wall_s"], "timing": got["shard_timing"],
                          "shards_rows_rate": shards,
                          "model_startup": [line for line in got["log"] if "model start-up" in line]}), flush=True)

emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokdir), model=f"random:{size}", path=tokdir,
                           device="cuda", compile=True, max_length=8192)
emb.packed.warmup()
emb.packed.warm_products(emb.batch_tokens)
enc = emb.tokenizer.encode(texts[:6000])
rates = []
for _ in range(3):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    emb.embed_encoded(enc)
    torch.cuda.synchronize()
    rates.append(round(int(enc.lengths.sum()) / (time.perf_counter() - t0)))
print(json.dumps({"model_alone_passes": rates, "model_alone": round(sum(rates[1:]) / 2)}), flush=True)
