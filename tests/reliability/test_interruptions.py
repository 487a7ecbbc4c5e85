"""Interrupted runs lose nothing: Ctrl-C (SIGINT) or SIGKILL during bottleneck extraction,
training or conversion, then the same command again.

Each test starts a real ``toolchain`` process, waits until it is inside the phase (by what the
phase itself writes or prints: the first cache entry; the line training prints as it starts and
its TensorBoard file; the line conversion prints, then the temporary file it is saving), signals
its process group as a terminal's Ctrl-C or a dying laptop would, checks what was left on disk,
and runs the same command to the end. No sleep decides where the signal lands. The rerun must
complete, reuse every bottleneck the first run wrote, and leave no temporary file: what a killed
writer left is swept (toolchain/atomic.py).
"""

from __future__ import annotations

import json
import re
import signal
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
    wait_for_line,
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
    log = tmp_path / "first.log"
    summaries = tmp_path / "out" / "summaries"
    process = start(tmp_path / "home", *args, log=log)
    marker = wait_for_line(log, "training the last layer for 8000 steps", process)
    assert marker.endswith("(bottlenecks: 0 cached, 300 computed)"), marker
    wait_for(lambda: list(summaries.rglob("events.out.tfevents.*")), process,
             "training opened its TensorBoard summaries")
    _stopped(interrupt(process, signum), signum, log)

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
    """The signal lands while the converted model is being saved and read back (its temporary
    file exists), the last moment a half-written model could be left behind."""
    out = tmp_path / "out"
    log = tmp_path / "first.log"
    args = ["build", "--image-dir", sample_dir, "--weights", "none", "--architecture", TINY_ARCH,
            "--bottleneck-dir", tmp_path / "cache", "--output-dir", out,
            "--how-many-training-steps", 100, "--target", "coreml"]
    process = start(tmp_path / "home", *args, log=log)
    wait_for_line(log, "coreml: converting to model_float32.mlmodel", process)
    (saving,) = wait_for(lambda: leftovers(out), process, "the model's temporary file")
    assert saving.name.startswith(".model_float32.mlmodel."), saving
    _stopped(interrupt(process, signum), signum, log)

    assert not (out / "model_float32.mlmodel").exists(), "the conversion had already finished"
    assert not (out / "report.json").exists()
    if signum == signal.SIGINT:
        assert leftovers(out) == []  # the interrupted writer removed its temporary file
    else:
        assert leftovers(out) == [saving]  # killed: left behind, for the rerun to sweep

    rerun = run(tmp_path / "home", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "verification passed" in rerun.stdout
    report = json.loads((out / "report.json").read_text())
    assert {Path(a["path"]).name for a in report["artifacts"]} == {"model_float32.mlmodel"}
    assert leftovers(tmp_path / "cache", out) == []
