"""The command line (``embed-corpus``): parses, calls the pipeline, reports errors as one line. Nothing imports it."""

from pipeline.cli.main import main

__all__ = ["main"]
