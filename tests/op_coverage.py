"""The executor's op coverage across pytest-xdist's processes (a pytest plugin, loaded by
``tests/conftest.py``).

``tests/toolchain/runtimes/conftest.py`` records which registered layer kinds and op types the
fast executor tests ran, and ``test_op_coverage.py`` fails for any that none ran. ``make test``
runs the suite in two processes, each with its own record, so there the meta-test cannot judge:
each process hands its record to the run's controller when it is done (xdist's
``workeroutput``), and the controller fails the run, naming every untested name, once all are
in. A process-local verdict would be a coin toss on which tests landed where.
"""

from __future__ import annotations

import pytest

#: The key of a process's record in xdist's ``workeroutput``.
KEY = "op_coverage"
_records: list[dict] = []


def registries():
    """The executor's two registries: NeuralNetwork layer kinds and ML Program op types."""
    from toolchain.runtimes import mlprogram, neuralnetwork  # noqa: F401 (fill the registries)
    from toolchain.runtimes.mil_ops import OPS
    from toolchain.runtimes.nn_layers import LAYERS

    return LAYERS, OPS


def untested(registries, executed: dict[str, set[str]]) -> dict[str, list[str]]:
    """Per registry noun, the registered names no test executed."""
    return {registry.noun: sorted(registry.names() - executed.get(registry.noun, set()))
            for registry in registries}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """The controller: keep each finished process's record."""
    record = getattr(node, "workeroutput", {}).get(KEY)
    if record is not None:
        _records.append(record)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller, once every process is done: fail the run for any name no process ran,
    when the processes between them ran every fast test of the executor's folder."""
    if hasattr(session.config, "workeroutput") or not _records:
        return
    if not any(record["meta_test"] for record in _records):
        return  # the meta-test was not in this run (other files, -k): nothing was asked
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    incomplete = sorted({reason for record in _records for reason in record["incomplete"]})
    if incomplete:
        reporter.write_line(f"op coverage not judged: {'; '.join(incomplete)}", yellow=True)
        return
    executed: dict[str, set[str]] = {}
    for record in _records:
        for noun, names in record["executed"].items():
            executed.setdefault(noun, set()).update(names)
    missing = {noun: names for noun, names in untested(registries(), executed).items()
               if names}
    if missing:
        reporter.ensure_newline()
        reporter.write_sep("=", "op coverage (tests/toolchain/runtimes/test_op_coverage.py)",
                           red=True)
        reporter.write_line(f"registered but run by no test: {missing}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
