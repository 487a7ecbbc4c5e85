"""Op coverage of the executor tests: which registered layers / ops the tests really run.

Coverage is recorded, not declared. For each test here that is not marked slow, an autouse
fixture gives both registries (NeuralNetwork layer kinds, ML Program op types) an ``executed``
set, which the plan fills with the kind of every step it runs. ``test_op_coverage.py`` runs
last (this conftest moves it there) and fails for every registered name that no fast test
executed: whole-model tests (slow) do not count, an op needs a test of its own that compares
it with a reference computation.

The meta-test needs the whole folder's fast tests in the session; when files are left out or
tests deselected (``-k``, ``-m slow``, ``--lf``), it skips and says why. Under pytest-xdist
(``make test``) each process hands its record to the run's controller, which judges the union
(tests/op_coverage.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import op_coverage

HERE = Path(__file__).parent
META_TEST = "test_op_coverage.py"

_executed: dict[str, set[str]] = {"layer": set(), "op": set()}
_session = {"files": set(), "deselected": []}


def _registries():
    return op_coverage.registries()


def _here(item) -> bool:
    return Path(item.path).parent == HERE


def pytest_deselected(items):
    _session["deselected"] += [item.nodeid for item in items
                               if _here(item) and not item.get_closest_marker("slow")]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Run the meta-test after every other test (of the whole session)."""
    meta = [item for item in items if _here(item) and item.path.name == META_TEST]
    for item in meta:
        items.remove(item)
    items.extend(meta)
    _session["files"] = {item.path.name for item in items if _here(item)}


@pytest.fixture(autouse=True)
def _record_executed_ops(request):
    if request.node.get_closest_marker("slow") or request.node.path.name == META_TEST:
        yield
        return
    registries = _registries()
    for registry in registries:
        registry.executed = set()
    try:
        yield
    finally:
        for registry in registries:
            _executed[registry.noun] |= registry.executed
            registry.executed = None


def _incomplete() -> list[str]:
    """Why this session cannot tell (files left out, fast tests deselected); none: it can."""
    missing_files = sorted({path.name for path in HERE.glob("test_*.py")} - _session["files"])
    reasons = []
    if missing_files:
        reasons.append(f"files not in this session: {', '.join(missing_files)}")
    if _session["deselected"]:
        reasons.append(f"{len(_session['deselected'])} fast tests deselected, e.g. "
                       f"{_session['deselected'][0]}")
    return reasons


def pytest_sessionfinish(session):
    """In a pytest-xdist process: this process's record, for the controller to judge."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output[op_coverage.KEY] = {
            "executed": {noun: sorted(names) for noun, names in _executed.items()},
            "incomplete": _incomplete(), "meta_test": META_TEST in _session["files"]}


@pytest.fixture(name="op_coverage")
def op_coverage_fixture():
    """``(registries, executed names by noun, why the session cannot tell or "")``."""
    return _registries(), _executed, "; ".join(_incomplete())
