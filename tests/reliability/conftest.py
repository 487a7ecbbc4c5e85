"""Fixtures for the reliability suite: real ``toolchain`` processes on messy data.

These tests run the command line in child processes, as users do, so that a crash, a
traceback, a signal or a file left behind is seen exactly as a user would see it. Each child
runs with its own HOME and XDG cache (nothing may be written outside the folders it is given)
and without root's power to ignore file modes (tests/privileges.py), so an unreadable photo or a
read-only folder is real on CI machines that run as root.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.privileges import drop_in_child

#: A tiny backbone: the point is the pipeline's behaviour, not accuracy.
TINY_ARCH = "mobilenet_v3_small_96"


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a child: its own home and caches, quiet TensorFlow."""
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1", "KERAS_HOME":
            str(home / ".keras"), "MPLCONFIGDIR": str(home / ".mpl")}


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "toolchain", *map(str, args)]


def run(home: Path, *args: object, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``toolchain ARGS`` to the end; stdout and stderr as text."""
    return subprocess.run(command(*args), env=cli_env(home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=drop_in_child)


def start(home: Path, *args: object, log: Path) -> subprocess.Popen:
    """Start ``toolchain ARGS`` in its own process group (as a shell runs a job; Ctrl-C in a
    terminal signals the whole group), stdout and stderr to ``log``."""
    handle = open(log, "w", encoding="utf-8")
    try:
        return subprocess.Popen(command(*args), env=cli_env(home), stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=drop_in_child)
    finally:
        handle.close()


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300,
             interval: float = 0.005):
    """Poll ``condition()`` until it returns something true; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}")
        time.sleep(interval)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def interrupt(process: subprocess.Popen, signum: int, timeout: float = 120) -> int:
    """Send ``signum`` to the run's process group and wait for it to end; its exit code."""
    os.killpg(process.pid, signum)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"the run did not stop within {timeout} s of signal {signum}")


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files and folders under ``folders`` (atomic's hidden ``.*.tmp``/``.old``)."""
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            found += [Path(dirpath) / name for name in dirnames + filenames
                      if name.startswith(".") and (".tmp" in name or name.endswith(".old"))]
    return found


def cache_entries(cache: Path) -> list[Path]:
    return [Path(d) / name for d, _, names in os.walk(cache) for name in names
            if name.endswith(".bn") and not name.startswith(".")]


def check_entries(cache: Path) -> int:
    """Every cache entry under a final name is complete and consistent; how many there are."""
    entries = cache_entries(cache)
    for path in entries:
        data = path.read_bytes()
        magic, count, crc = struct.unpack_from("<4sII", data)
        assert magic == b"TCBN" and len(data) == 12 + 4 * count, path
        assert zlib.crc32(data[12:]) == crc, path
    return len(entries)


def no_traceback(result) -> None:
    text = result if isinstance(result, str) else result.stdout + result.stderr
    assert "Traceback" not in text, text


@pytest.fixture(scope="session")
def many_photos(tmp_path_factory) -> Path:
    """The sample data with 50 images per class (300): extraction lasts long enough to be hit."""
    from toolchain.sample_photos import write_sample_data

    out = tmp_path_factory.mktemp("many") / "photos"
    write_sample_data(out, per_class=50, seed=3)
    return out
