"""The package layout keeps its dependency rule: imports run one way between the sub-packages.

Every ``import`` of every module under ``pipeline/`` is parsed (top-level and function-level alike, so a lazy
import cannot hide a cycle) and checked against ``ALLOWED``, the table ``pipeline/ARCHITECTURE.md`` states.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Which part of the package may import which. A part is a sub-package, or a top-level module (the shared base).
BASE = {"errors", "util", "__init__"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "util": set(),
    "__init__": set(),
    "model": BASE | {"model"},
    "job": BASE | {"model", "job"},
    "index": BASE | {"model", "job", "index"},
    "serve": BASE | {"model", "job", "index", "serve"},
    "bench": BASE | {"model", "job", "index", "serve", "bench"},
    "cli": BASE | {"model", "job", "index", "serve", "bench", "cli"},
}
PURE = {"model/batching.py": {"numpy", "__future__", "collections", "typing", "dataclasses", "math"}}


def part_of(module: str) -> str:
    """``pipeline.job.plan`` -> ``job``; ``pipeline.util`` -> ``util``; ``pipeline`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(package.parent).with_suffix("")
    here = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "pipeline":  # from pipeline import job -> pipeline.job; import __version__ -> pipeline
                out += [(node.lineno, f"pipeline.{a.name}" if _is_module(a.name) else "pipeline") for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def violations(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks ``ALLOWED`` or ``PURE``, as ``file:line: what``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        source = part_of("pipeline." + ".".join(rel.with_suffix("").parts))
        allowed = ALLOWED.get(source)
        if allowed is None:
            found.append(f"{rel}: part {source!r} is not in the layout table (tests/test_layout.py, ARCHITECTURE.md)")
            continue
        for line, module in imported_modules(path, package):
            if module.split(".")[0] == "pipeline":
                target = part_of(module)
                if target not in allowed:
                    found.append(f"{rel}:{line}: {source} imports {module} ({source} may import: "
                                 f"{', '.join(sorted(allowed)) or 'nothing of the pipeline'})")
            elif rel.as_posix() in PURE and module.split(".")[0] not in PURE[rel.as_posix()]:
                found.append(f"{rel}:{line}: {module} in a pure module (allowed: {sorted(PURE[rel.as_posix()])})")
    return found


def test_imports_follow_the_layout() -> None:
    assert violations() == []


def test_a_planted_violation_is_caught(tmp_path: Path) -> None:
    """The check has teeth: copies of the package with one wrong import each are refused, naming the line."""
    import shutil

    plants = {
        "model/encoder.py": "from pipeline.job.config import JobConfig\n",  # the model layer must know no job
        "job/launch.py": "    from pipeline.cli.common import fail\n",  # nothing imports the CLI (lazily neither)
        "index/search.py": "from pipeline.bench import gpu\n",  # nothing in the pipeline imports benchmarks
        "model/batching.py": "import torch\n",  # batching stays pure
    }
    for target, line in plants.items():
        copy = tmp_path / target.replace("/", "_") / "pipeline"
        shutil.copytree(PACKAGE, copy)
        path = copy / target
        text = path.read_text()
        if line.startswith("    "):  # a lazy import inside the first function
            head, sep, rest = text.partition('"""\n')
            first_def = rest.index("\ndef ")
            body = rest.index(":\n", first_def) + 2
            text = head + sep + rest[:body] + line + rest[body:]
        else:
            future = "from __future__ import annotations\n"
            text = text.replace(future, future + line, 1)
        path.write_text(text)
        found = violations(copy)
        assert len(found) == 1 and found[0].startswith(target), (target, found)


@pytest.mark.parametrize("module", ["pipeline.cli", "pipeline.job.runner", "pipeline.index.store",
                                    "pipeline.serve.app"])
def test_modules_import(module: str) -> None:
    import importlib

    importlib.import_module(module)


def test_modules_stay_readable() -> None:
    """No module over ~600 lines unless ARCHITECTURE.md states why."""
    architecture = (PACKAGE / "ARCHITECTURE.md").read_text()
    long = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) > 620]
    unexplained = [p for p in long if f"`{p}` is long" not in architecture]
    assert unexplained == []


def _unguarded_empty_array_expansions(text: str) -> list[str]:
    """``"${a[@]}"`` / ``${a[*]}`` of arrays that can be empty (``a=()``, ``read -a a``), not written
    ``${a[@]+"${a[@]}"}``: under ``set -u``, bash before 4.4 stops there ("unbound variable")."""
    import re

    if not re.search(r"^\s*set -[a-z]*u", text, re.M):
        return []
    names = set(re.findall(r"\b([A-Za-z_]\w*)=\(\)", text)) | set(re.findall(r"read -r -a (\w+)", text))
    bad = []
    for name in names:
        for m in re.finditer(r'\$\{' + name + r'\[[@*]\]([^}]*)\}', text):
            guarded = m.group(1).startswith("+") or text[max(0, m.start() - len(name) - 6):m.start()].endswith("+\"")
            if not guarded:
                bad.append(m.group(0))
    return bad


def test_shell_scripts_run_on_old_bash() -> None:
    """Slurm clusters still run RHEL/CentOS 7 (bash 4.2): an empty array expanded under ``set -u`` there is an
    unbound variable, and the index job's `"${pieces[@]}"` stopped every whole-index build that way."""
    root = Path(__file__).resolve().parents[1]
    scripts = [*root.glob("jobs/**/*.sh"), *root.glob("jobs/**/*.sbatch"), root / ".ci" / "run"]
    found = {str(p.relative_to(root)): bad for p in scripts
             if (bad := _unguarded_empty_array_expansions(p.read_text()))}
    assert not found, found
    planted = 'set -uo pipefail\nx=()\necho "${x[@]}" ${y[@]+"${y[@]}"}\n'
    assert _unguarded_empty_array_expansions(planted) == ['${x[@]}']
