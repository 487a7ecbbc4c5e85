"""The suite's watchdog (tests/watchdog.py): a test that hangs fails with every thread's stack.

Each case runs a small test file in a child pytest with the suite's own configuration
(pyproject.toml) and a limit of a few seconds, so the hang is real and the outcome is what CI
would print."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _make_test_options() -> tuple[str, ...]:
    """The pytest options ``make test`` (CI) runs the suite with: its test processes."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    workers = re.search(r"^WORKERS \?= (\d+)$", makefile, re.MULTILINE).group(1)
    options = re.search(r"^PYTEST := -m pytest (.*)$", makefile, re.MULTILINE).group(1)
    return tuple(options.replace("$(WORKERS)", workers).split())


#: A child pytest in one process, and as ``make test`` runs it (pytest-xdist's workers).
RUNS = {"one process": (), "make test": _make_test_options()}


def _pytest(tmp_path: Path, source: str, *options: str) -> subprocess.CompletedProcess:
    """Run ``source`` as a test file in a child pytest configured as the suite is, with a limit
    of 3 seconds per test and a hard stop 3 seconds later."""
    test_file = tmp_path / "test_hangs.py"
    test_file.write_text(textwrap.dedent(source), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
         str(tmp_path), "-p", "no:cacheprovider", "-p", "tests.watchdog", "-o", "timeout=3",
         "-o", "watchdog_grace=3", *options, str(test_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_the_suite_loads_the_watchdog_with_a_limit_per_test(request):
    config = request.config
    assert config.pluginmanager.has_plugin("tests.watchdog")
    assert config.getini("timeout_method") == "signal"
    assert float(config.getini("timeout")) > 0


def test_make_test_runs_the_suite_in_test_processes():
    assert "--numprocesses" in RUNS["make test"] and "--dist" in RUNS["make test"]


@pytest.mark.parametrize("run", RUNS)
def test_a_wait_that_never_ends_fails_its_test_and_the_suite_goes_on(tmp_path, run):
    """The test waits on a condition no one will signal, as MediaPipe's finaliser did, while
    another thread waits too: the test fails with the main thread's traceback and the other
    thread's stack, and the next test runs."""
    result = _pytest(tmp_path, """
        import threading

        def test_waits_forever():
            never = threading.Event()
            threading.Thread(target=never.wait, name="helper-thread", daemon=True).start()
            never.wait()

        def test_after_it():
            pass
    """, *RUNS[run])
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Stack of helper-thread" in out, out
    assert "test_hangs.py:7: " in out and "Failed: Timeout (>3.0s) from pytest-timeout" in out, out
    assert "test_hangs.py::test_waits_forever" in out and "1 failed, 1 passed" in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="a zeroed pthread mutex is an unlocked one only in glibc")
@pytest.mark.parametrize("run", RUNS)
def test_a_native_deadlock_holding_the_gil_ends_the_run_with_its_stack(tmp_path, run):
    """Native code that never returns to Python (here a mutex locked twice by one thread,
    called through PyDLL, which keeps the GIL): no signal handler can run, so faulthandler's
    own thread prints every stack and ends the process instead of letting it wait forever.
    In one process that ends the run; under ``make test`` it ends the test's worker, which
    pytest-xdist reports as crashed in that test, and the run goes on and fails."""
    result = _pytest(tmp_path, """
        import ctypes

        def test_deadlocks_holding_the_gil():
            libc = ctypes.PyDLL(None)
            mutex = ctypes.create_string_buffer(64)  # all zero: an unlocked default mutex
            libc.pthread_mutex_lock(mutex)
            libc.pthread_mutex_lock(mutex)  # the same thread again: never returns

        def test_never_reached():
            pass
    """, *RUNS[run])
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Timeout (0:00:06)!" in out, out
    assert 'test_hangs.py", line 8 in test_deadlocks_holding_the_gil' in out, out
    if run == "one process":
        assert "passed" not in out, out
    else:
        assert re.search(r"worker 'gw\d' crashed while running "
                         r"'test_hangs.py::test_deadlocks_holding_the_gil'", out), out
        assert "1 failed, 1 passed" in out, out
