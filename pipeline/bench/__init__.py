"""Benchmarks and offline stand-ins (GPU, index, serving, job vs plain loop, synthetic Qwen3 models).

Nothing in the pipeline imports them; the CLI and the tests do.
"""
