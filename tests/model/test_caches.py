"""The start-up caches (``caches.py``): compiled kernels and the bytecode of what a worker imports."""

import importlib.util
import os
import subprocess
import sys

import pytest
from helpers import subprocess_env

from pipeline.model.caches import compile_cache_dir, use_bytecode_cache, use_compile_cache


def test_compile_cache_goes_to_the_documented_folder_unless_the_user_chose_one(monkeypatch, tmp_path):
    for var in ("EMBED_CORPUS_COMPILE_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "embed-corpus" / "compile"
    monkeypatch.setenv("EMBED_CORPUS_COMPILE_CACHE", str(tmp_path / "shared"))
    assert use_compile_cache() == tmp_path / "shared" / "inductor"
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "shared" / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine"  # the user's own setting wins


@pytest.fixture
def bytecode_off(monkeypatch, tmp_path):
    """This process as the H200 image runs it (bytecode writing off, no folder chosen), a package ``fakepkg``
    with no bytecode beside its sources, and the compile cache in ``tmp_path / "cache"``."""
    src = tmp_path / "site" / "fakepkg"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setenv("EMBED_CORPUS_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EMBED_CORPUS_BYTECODE_CACHE", raising=False)
    return src


def test_bytecode_goes_to_the_cache_folder_where_python_would_compile_the_sources_every_time(bytecode_off, tmp_path):
    assert use_bytecode_cache("fakepkg") == tmp_path / "cache" / "bytecode"
    assert sys.pycache_prefix == str(tmp_path / "cache" / "bytecode") and not sys.dont_write_bytecode


def test_bytecode_folder_is_left_alone_where_python_keeps_the_bytecode_itself(bytecode_off, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # the sources' folder is writable
    assert use_bytecode_cache("fakepkg") is None and sys.pycache_prefix is None
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    cached = importlib.util.cache_from_source(str(bytecode_off / "__init__.py"))
    os.makedirs(os.path.dirname(cached))
    open(cached, "wb").close()  # bytecode shipped beside the sources
    assert use_bytecode_cache("fakepkg") is None and sys.pycache_prefix is None


def test_bytecode_folder_of_the_users_choice_wins_and_the_cache_can_be_turned_off(bytecode_off, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBED_CORPUS_BYTECODE_CACHE", "0")
    assert use_bytecode_cache("fakepkg") is None and sys.pycache_prefix is None
    monkeypatch.delenv("EMBED_CORPUS_BYTECODE_CACHE")
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "mine"))  # PYTHONPYCACHEPREFIX
    assert use_bytecode_cache("fakepkg") is None and sys.pycache_prefix == str(tmp_path / "mine")
    assert use_bytecode_cache("no_such_package_here") is None


def test_a_second_process_reads_the_bytecode_the_first_wrote(bytecode_off, tmp_path):
    """Two processes with ``PYTHONDONTWRITEBYTECODE=1`` (the image's setting): the first writes ``fakepkg``'s
    bytecode into the cache, the second loads it from there instead of compiling the source again."""
    code = """
import importlib.util, sys
from pipeline.model.caches import use_bytecode_cache
print(use_bytecode_cache("fakepkg"))
spec = importlib.util.find_spec("fakepkg")
print(spec.cached)
import fakepkg
assert fakepkg.VALUE == 42
"""
    env = {**subprocess_env(), "PYTHONDONTWRITEBYTECODE": "1", "EMBED_CORPUS_COMPILE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("EMBED_CORPUS_BYTECODE_CACHE", None)
    stamps = []
    for _ in range(2):
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, got.stderr[-2000:]
        folder, cached = got.stdout.split()
        assert folder == str(tmp_path / "cache" / "bytecode") and cached.startswith(folder), got.stdout
        stamps.append(os.stat(cached).st_mtime_ns)
    assert stamps[0] == stamps[1]  # read, not written again
    assert not (bytecode_off / "__pycache__").exists()  # nothing written beside the sources
