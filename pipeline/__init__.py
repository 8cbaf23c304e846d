"""embed-corpus: offline bulk corpus vectorization (Parquet/JSONL in, embedding Parquet out, resumable)."""

__version__ = "0.1.0"
