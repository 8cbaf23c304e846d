"""What a worker keeps on disk between runs so that its next start-up is short: compiled kernels (Inductor's and
Triton's caches) and the bytecode of the Python it imports. Both live under ``compile_cache_dir()``. Nothing here
imports torch: the bytecode cache has to be in place before torch is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept between runs: ``$EMBED_CORPUS_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/embed-corpus/compile`` (``~/.cache/embed-corpus/compile``)."""
    explicit = os.environ.get("EMBED_CORPUS_COMPILE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embed-corpus" / "compile"


def use_compile_cache() -> Path:
    """Point torch.compile's (Inductor's) and Triton's on-disk caches at ``compile_cache_dir()``, unless
    ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` are set already (then those win). Their defaults live
    under ``/tmp`` (Inductor) and ``~/.triton``: a cluster node's ``/tmp`` is often emptied between jobs, and a
    folder on a shared filesystem lets every worker of every node reuse what the first one compiled (both
    caches write each entry under a temporary name and rename it, so workers can share them).

    Returns:
        The folder in use for Inductor's cache.
    """
    root = compile_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def use_bytecode_cache(package: str = "torch") -> Path | None:
    """Keep the bytecode of what this process imports from now on in ``compile_cache_dir() / "bytecode"``
    where Python would otherwise compile ``package``'s sources again in every process.

    That is the case where ``package`` has no bytecode beside its sources and Python will not write it there:
    writing is off (``PYTHONDONTWRITEBYTECODE``, as container images often set) or its folder is read-only (an
    Apptainer image). On the H200 image (torch with no bytecode, writing off), importing torch, transformers'
    model code and Inductor took 14-25 s of every worker's start-up, most of it compiling sources. Python
    writes each file under a temporary name and renames it, so processes can share the folder.

    Call it before ``package`` is imported. Does nothing where the user chose a folder
    (``PYTHONPYCACHEPREFIX``), where ``EMBED_CORPUS_BYTECODE_CACHE=0``, or where Python keeps ``package``'s
    bytecode itself.

    Returns:
        The folder now in use, or None where nothing changed.
    """
    if sys.pycache_prefix is not None or os.environ.get("EMBED_CORPUS_BYTECODE_CACHE") == "0":
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return None  # bytecode shipped or kept beside the sources
    if not sys.dont_write_bytecode and os.access(os.path.dirname(spec.origin), os.W_OK):
        return None  # Python writes it there on this import
    folder = compile_cache_dir() / "bytecode"
    sys.pycache_prefix = str(folder)
    sys.dont_write_bytecode = False
    return folder
