"""Probe (GPU): the residual adds inside the output projections' matrix products (``addmm`` writing float32)
against the default (a matrix product in bf16, then an add pass into the float32 stream).

Per size, one process: the bench's random model of the exact shape, the bench's corpus, the compiled default
and its ``variant(gemm_residual=True)`` sharing the weights; model-alone passes interleaved
(``bench.paths.changes_ab``) and each path's cosine to the float32 model (``bench.paths.float32_reference``).
Prints one JSON line per size.

    python3 jobs/probe_gemm_residual.py TOKENIZER_DIR SIZE=DOCS [SIZE=DOCS ...]
"""

import json
import sys

from transformers import AutoTokenizer

from pipeline.bench import paths
from pipeline.bench.gpu import make_corpus, random_model
from pipeline.model.encoder import Embedder


def probe(tokdir: str, size: str, n_docs: int) -> dict:
    import torch

    tok = AutoTokenizer.from_pretrained(tokdir)
    tok.model_max_length = 1 << 30
    texts = make_corpus(tok, n_docs)
    model = random_model(size, "cuda", "bfloat16")
    emb = Embedder.from_loaded(model, AutoTokenizer.from_pretrained(tokdir), model=f"random:{size}", path=tokdir,
                               device="cuda", compile=True, max_length=8192)
    emb.packed.warmup()
    enc = emb.tokenizer.encode(texts)
    out = {"size": size, "docs": n_docs}
    out["ab"] = paths.changes_ab(model, tokdir, emb, enc, "cuda", 3,
                                 changes={"residual_add_in_the_matrix_product": {"gemm_residual": True}})
    other = paths.embedder_on(model, emb.packed.variant(gemm_residual=True), tokdir, "cuda",
                              batch_tokens=emb.batch_tokens, max_length=8192)
    vectors = {"default": emb.embed_encoded(enc), "residual_add_in_the_matrix_product": other.embed_encoded(enc)}
    out["vs_float32_reference"] = paths.float32_reference(model, enc, 32, vectors)
    del emb, other, model
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    for arg in sys.argv[2:]:
        size, docs = arg.split("=")
        print(json.dumps(probe(sys.argv[1], size, int(docs))), flush=True)
