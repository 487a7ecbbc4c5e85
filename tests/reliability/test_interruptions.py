"""Interrupted runs lose nothing: Ctrl-C (SIGINT) or SIGKILL during bottleneck extraction,
training or conversion, then the same command again.

Each test starts a real ``toolchain`` process, waits until it is inside the phase (seen from
the files it writes), signals its process group as a terminal's Ctrl-C or a dying laptop
would, checks what was left on disk, and runs the same command to the end. The rerun must
complete, reuse every bottleneck the first run wrote, and leave no temporary file: what a
killed writer left is swept (toolchain/atomic.py).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (
    TINY_ARCH,
    cache_entries,
    check_entries,
    interrupt,
    leftovers,
    no_traceback,
    run,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGKILL, id="SIGKILL")]


def _stopped(code: int, signum: int, log: Path) -> None:
    text = log.read_text(encoding="utf-8")
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL, text
    else:
        no_traceback(text)
        assert code == 130, text
        assert "toolchain: interrupted; everything written so far is complete and kept" in text


def _reused(stdout: str) -> tuple[int, int]:
    found = re.search(r"bottlenecks: (\d+) cached, (\d+) computed", stdout)
    assert found, stdout
    return int(found[1]), int(found[2])


def _retrain(tmp_path: Path, photos: Path, steps: int) -> list:
    return ["retrain", "--image-dir", photos, "--weights", "none", "--architecture", TINY_ARCH,
            "--bottleneck-dir", tmp_path / "cache", "--output-dir", tmp_path / "out",
            "--how-many-training-steps", steps]


@pytest.mark.parametrize("signum", SIGNALS)
def test_interrupted_extraction_keeps_every_written_bottleneck(tmp_path, many_photos, signum):
    args = _retrain(tmp_path, many_photos, 200)
    process = start(tmp_path / "home", *args, log=tmp_path / "first.log")
    wait_for(lambda: cache_entries(tmp_path / "cache"), process, "the first bottleneck was written")
    _stopped(interrupt(process, signum), signum, tmp_path / "first.log")

    kept = check_entries(tmp_path / "cache")
    assert 0 < kept < 300, f"{kept} of 300 bottlenecks: the signal did not land mid-extraction"
    assert not (tmp_path / "out" / "model.json").exists()
    if signum == signal.SIGINT:
        assert leftovers(tmp_path / "cache") == []

    rerun = run(tmp_path / "home", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _reused(rerun.stdout) == (kept, 300 - kept)
    assert check_entries(tmp_path / "cache") == 300
    assert leftovers(tmp_path / "cache", tmp_path / "out") == []


@pytest.mark.parametrize("signum", SIGNALS)
def test_interrupted_training_writes_no_model_and_reruns(tmp_path, many_photos, signum):
    args = _retrain(tmp_path, many_photos, 8000)
    summaries = tmp_path / "out" / "summaries"
    process = start(tmp_path / "home", *args, log=tmp_path / "first.log")
    wait_for(lambda: list(summaries.rglob("events.out.tfevents.*")), process,
             "training started")
    time.sleep(1.0)
    _stopped(interrupt(process, signum), signum, tmp_path / "first.log")

    assert not (tmp_path / "out" / "model.json").exists(), "training had already finished"
    assert not (tmp_path / "out" / "model.keras").exists()
    assert check_entries(tmp_path / "cache") == 300

    rerun = run(tmp_path / "home", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _reused(rerun.stdout) == (300, 0)
    assert json.loads((tmp_path / "out" / "model.json").read_text())["training_steps"] == 8000
    assert leftovers(tmp_path / "cache", tmp_path / "out") == []


@pytest.mark.parametrize("signum", SIGNALS)
def test_interrupted_conversion_leaves_no_half_written_model(tmp_path, sample_dir, signum):
    out = tmp_path / "out"
    args = ["build", "--image-dir", sample_dir, "--weights", "none", "--architecture", TINY_ARCH,
            "--bottleneck-dir", tmp_path / "cache", "--output-dir", out,
            "--how-many-training-steps", 100, "--target", "coreml"]
    process = start(tmp_path / "home", *args, log=tmp_path / "first.log")
    wait_for(lambda: (out / "model" / "model.json").exists(), process, "conversion started",
             interval=0.05)
    time.sleep(2.0)  # well inside the Core ML conversion (about 10 s for this model)
    _stopped(interrupt(process, signum), signum, tmp_path / "first.log")

    assert not (out / "model_float32.mlmodel").exists(), "the conversion had already finished"
    assert not (out / "report.json").exists()
    if signum == signal.SIGINT:
        assert leftovers(out) == []

    rerun = run(tmp_path / "home", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "verification passed" in rerun.stdout
    report = json.loads((out / "report.json").read_text())
    assert {Path(a["path"]).name for a in report["artifacts"]} == {"model_float32.mlmodel"}
    assert leftovers(tmp_path / "cache", out) == []
