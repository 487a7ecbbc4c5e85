"""Two ``toolchain build`` runs sharing one bottleneck cache at the same time.

Both must finish with correct, verified results, and the shared cache must hold exactly one
complete entry per image: entries and the TFLite engine are written under temporary names and
renamed, so the runs may race to write the same entry without either reading half of it.

That the runs really overlapped is made certain, not left to the scheduler: the first build is
paused (SIGSTOP) in the middle of its extraction, the second starts, reads the first's entries
from the shared cache and starts computing the rest, then the first resumes, and both compute
the same missing entries at the same time. Their own output shows it: each prints how many
bottlenecks it read from the cache and how many it computed.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers import (
    TINY_ARCH,
    cache_entries,
    check_entries,
    leftovers,
    no_traceback,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow


def _all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T in /proc): nothing of it runs any more."""
    try:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:  # a thread ended while being read: look again
        return False
    return bool(states) and all(state in "tT" for state in states)


def _bottlenecks(log: Path) -> tuple[int, int]:
    """(cached, computed), as the build printed them when training started."""
    text = log.read_text(encoding="utf-8")
    found = re.findall(r"training the last layer for \d+ steps "
                       r"\(bottlenecks: (\d+) cached, (\d+) computed\)", text)
    assert len(found) == 1, text
    return int(found[0][0]), int(found[0][1])


def test_two_builds_share_one_cache(tmp_path, many_photos):
    cache = tmp_path / "shared cache"
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}

    def build(name: str):
        return start(tmp_path / "home", "build", "--image-dir", many_photos, "--weights", "none",
                     "--architecture", TINY_ARCH, "--bottleneck-dir", cache, "--output-dir",
                     tmp_path / name, "--how-many-training-steps", 200, "--target", "tflite",
                     "--tflite-variant", "float32", "--accept-small-set", log=logs[name])

    runs = [build("first")]
    try:
        wait_for(lambda: cache_entries(cache), runs[0], "the first build wrote a bottleneck")
        os.killpg(runs[0].pid, signal.SIGSTOP)
        wait_for(lambda: _all_stopped(runs[0].pid), runs[0], "the first build to stop")
        paused_at = check_entries(cache)
        assert 0 < paused_at < 300, f"paused with {paused_at} of 300 bottlenecks written"
        runs.append(build("second"))
        wait_for(lambda: len(cache_entries(cache)) > paused_at, runs[1],
                 "the second build computed a bottleneck")
        os.killpg(runs[0].pid, signal.SIGCONT)
        codes = [process.wait(900) for process in runs]
    finally:
        for process in runs:
            if process.poll() is None:  # the test failed: leave nothing running or stopped
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    texts = {name: log.read_text(encoding="utf-8") for name, log in logs.items()}
    for code, text in zip(codes, texts.values()):
        no_traceback(text)
        assert code == 0, text
        assert "verification passed" in text
        assert not re.search(r"corrupt|recomputing", text), text
    # The first found an empty cache and computed every entry, the last ones while the second
    # was computing them too; the second found exactly what the first had written when it was
    # paused, mid-extraction, and computed the rest.
    assert _bottlenecks(logs["first"]) == (0, 300)
    assert _bottlenecks(logs["second"]) == (paused_at, 300 - paused_at)

    assert check_entries(cache) == 300
    manifests = [json.loads((tmp_path / name / "model" / "model.json").read_text())
                 for name in ("first", "second")]
    assert manifests[0]["labels"] == manifests[1]["labels"]
    # The same bottlenecks and the same seed: the same model, whoever computed each entry.
    assert manifests[0]["test_accuracy"] == manifests[1]["test_accuracy"]
    assert list(cache.rglob("engines/*.tflite")) and leftovers(cache) == []
