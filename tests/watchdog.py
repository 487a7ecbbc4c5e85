"""The suite's watchdog (a pytest plugin, loaded by ``-p tests.watchdog`` in pyproject.toml): a
test that hangs fails with every thread's stack, instead of holding CI until its time limit.

A hang comes in two kinds, so there are two layers:

- **A wait Python can interrupt** (a lock, a condition, a queue, a sleep, a child process, C code
  that releases the GIL and returns on a signal): pytest-timeout, configured in pyproject.toml
  (``timeout``, ``timeout_method = "signal"``), prints every thread's stack after ``timeout``
  seconds and raises in the test, which fails; the suite goes on to the next test.
- **A hang nothing in Python can interrupt** (native code deadlocked while holding the GIL; an
  exception raised inside a finaliser, which Python swallows): faulthandler's own C thread,
  armed here for every test :data:`GRACE` seconds past the limit, prints every thread's stack
  (the hung test's frame among them) and ends the run with exit 1, so CI fails at once and names
  the test, rather than after 90 minutes with no name.

``tests/test_watchdog.py`` hangs a test of each kind on purpose and checks both outcomes.
"""

from __future__ import annotations

import faulthandler
import os

import pytest

#: Seconds past pytest-timeout's limit before the hard stop (the ``watchdog_grace`` ini value):
#: time for its own stack dump and the test's teardown when the signal did get through.
GRACE = 60


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("watchdog_grace", "seconds past --timeout before a test that cannot be "
                                    "interrupted ends the run with every thread's stack",
                  default=str(GRACE))


def _limit(config: pytest.Config) -> float:
    """pytest-timeout's per-test limit in seconds (``--timeout``, ``PYTEST_TIMEOUT`` or the
    ``timeout`` ini value); 0 when it is off."""
    value = config.getoption("timeout", None)
    if value is None:
        value = os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout") or 0
    return float(value)


def pytest_configure(config: pytest.Config) -> None:
    # Output capture is suspended while plugins are configured, so descriptor 2 is the real
    # stderr (the CI log) here; a copy stays valid while capture swaps descriptor 2 per test.
    config.stash[_STDERR] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.cancel_dump_traceback_later()
    os.close(config.stash[_STDERR])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    limit = _limit(item.config)
    if limit > 0:
        grace = float(item.config.getini("watchdog_grace"))
        faulthandler.dump_traceback_later(limit + grace, exit=True,
                                          file=item.config.stash[_STDERR])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


_STDERR = pytest.StashKey[int]()
