"""The rules of docs/ARCHITECTURE.md that a machine can check: layers and imports, file sizes,
docstrings, and a repository that documents itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: docs/ARCHITECTURE.md's layers: a module imports only from its layer or those below.
LAYERS = {
    0: ["toolchain.errors", "toolchain.options", "toolchain.atomic", "toolchain.images",
        "toolchain.patches", "toolchain.statistics", "toolchain.untrusted"],
    1: ["toolchain.dataset", "toolchain.distortions", "toolchain.backbones",
        "toolchain.poets", "toolchain.sample_photos", "toolchain.cifar10"],
    2: ["toolchain.runtimes"],
    3: ["targets"],
    4: ["toolchain.engine", "toolchain.cache", "toolchain.model", "toolchain.training",
        "toolchain.graphs", "toolchain.conversion", "toolchain.originals", "toolchain.heldout",
        "toolchain.measure", "toolchain.checks", "toolchain.verification", "toolchain.report",
        "toolchain.classification", "toolchain.gate", "toolchain.apps", "toolchain.chain"],
    5: ["toolchain.commands", "toolchain.bench", "toolchain.bench_chain",
        "toolchain.bench_scale", "toolchain.bench_mlmodel"],
    6: ["toolchain.cli", "toolchain", "toolchain.__main__"],
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.glob("toolchain/**/*.py"), *ROOT.glob("targets/**/*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _layer(module: str) -> int:
    """The layer of a module: its own entry, else its package's (``targets.coreml``: 3)."""
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            if module == name or (module.startswith(name + ".") and name != "toolchain"):
                if best is None or len(name) > len(best[1]):
                    best = (layer, name)
    if best is None:
        raise AssertionError(f"{module} has no layer in docs/ARCHITECTURE.md (and LAYERS here)")
    return best[0]


def _imports(path: Path) -> set[str]:
    """First-party modules ``path`` imports (``from toolchain import x`` counts as
    ``toolchain.x`` when x is a module)."""
    modules = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return {name for name in found if name.split(".")[0] in ("toolchain", "targets")}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_imports_only_its_layer_and_below(module):
    if module == "toolchain":
        # The API's __init__ imports errors at import time and the commands inside functions.
        assert _imports(_modules()[module]) <= {"toolchain.errors", "toolchain.options",
                                                "toolchain.commands"}
        return
    mine = _layer(module)
    for imported in _imports(_modules()[module]):
        if imported == "toolchain":  # ``from toolchain import __version__``
            continue
        assert _layer(imported) <= mine, f"{module} (layer {mine}) imports {imported} " \
                                         f"(layer {_layer(imported)})"


def test_the_runtimes_import_nothing_of_the_project_but_errors_and_the_untrusted_checks():
    for module, path in _modules().items():
        if module.startswith("toolchain.runtimes"):
            outside = {name for name in _imports(path)
                       if not name.startswith(("toolchain.runtimes", "toolchain.untrusted"))}
            assert outside <= {"toolchain.errors"}, (module, outside)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_files_are_small_and_say_what_they_hold(module):
    path = _modules()[module]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: over {MAX_LINES} lines"
    assert ast.get_docstring(ast.parse(text)), f"{path} has no docstring"


def test_every_documented_layer_module_exists():
    modules = _modules()
    for names in LAYERS.values():
        for name in names:
            assert name in modules, f"docs/ARCHITECTURE.md names {name}, which does not exist"
    document = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for names in LAYERS.values():
        for name in names:
            if name not in ("toolchain", "toolchain.__main__"):
                assert f"`{name}`" in document, f"docs/ARCHITECTURE.md does not list {name}"


def test_the_repository_points_only_at_itself():
    """Code, tests and docs refer to documents in the repository, never outside it."""
    import os

    pattern = re.compile(r"DESIGN\.md|\.\./shared|shared/DESIGN")
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "__pycache__")]
        for name in files:
            path = Path(folder) / name
            if path.suffix not in (".py", ".md", ".toml", ".kt", ".kts", ".swift", ".txt", "") \
                    or path == Path(__file__):
                continue
            try:
                if pattern.search(path.read_text(encoding="utf-8")):
                    offenders.append(str(path.relative_to(ROOT)))
            except (UnicodeDecodeError, OSError):
                continue
    assert offenders == []


def test_errors_are_raised_by_their_named_type():
    """A bare ToolchainError says nothing a caller can catch by kind: each has its own type."""
    bare = [module for module, path in _modules().items()
            if "raise ToolchainError(" in path.read_text(encoding="utf-8")]
    assert bare == []


def test_the_version_is_written_once():
    """pyproject.toml takes the version from ``toolchain.__version__``; the installed
    distribution reports that same version."""
    import importlib.metadata
    import tomllib

    import toolchain

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("toolchain") == toolchain.__version__
