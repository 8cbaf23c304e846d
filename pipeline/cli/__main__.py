"""``python -m pipeline.cli``: the ``embed-corpus`` command."""

from pipeline.cli import main

main()
