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
import shutil
import signal
import socket
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
            "--how-many-training-steps", 100, "--target", "coreml", "--accept-small-set"]
    process = start(tmp_path / "home", *args, log=log)
    wait_for_line(log, "coreml: converting to model_float32.mlmodel", process)
    # The build writes into a hidden sibling of out (toolchain/chain.py), swapped in at the end.
    (saving,) = wait_for(lambda: [path for path in leftovers(tmp_path)
                                  if path.name.startswith(".model_float32.mlmodel.")],
                         process, "the model's temporary file")
    stage = saving.parent
    assert stage.parent == tmp_path and stage.name.startswith(".out."), saving
    _stopped(interrupt(process, signum), signum, log)

    assert not out.exists(), "the build had already finished"
    if signum == signal.SIGINT:
        assert leftovers(tmp_path) == []  # the interrupted build removed its stage
    else:  # killed: left behind, for the rerun to sweep
        assert stage in leftovers(tmp_path) and saving.exists()

    rerun = run(tmp_path / "home", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "verification passed" in rerun.stdout
    report = json.loads((out / "report.json").read_text())
    assert {Path(a["path"]).name for a in report["artifacts"]} == {"model_float32.mlmodel"}
    assert leftovers(tmp_path / "cache", out) == []


#: Where a second build is killed: the line each stage prints as it starts.
STAGES = [pytest.param("training the last layer for", id="training"),
          pytest.param("coreml: converting to model_float32.mlmodel", id="conversion"),
          pytest.param("verifying 1 artifact(s)", id="verification")]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def first_build(tmp_path_factory, sample_dir) -> Path:
    """A passing TFLite build, copied by each test that rebuilds over it."""
    root = tmp_path_factory.mktemp("first")
    done = run(root / "home", *_build(sample_dir, root / "cache", root / "out", "tflite"))
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _build(photos: Path, cache: Path, out: Path, target: str) -> list:
    return ["build", "--image-dir", photos, "--weights", "none", "--architecture", TINY_ARCH,
            "--bottleneck-dir", cache, "--output-dir", out, "--how-many-training-steps", 300,
            "--target", target, *(["--tflite-variant", "float32"] if target == "tflite" else []),
            "--accept-small-set"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_second_build_killed_at_any_stage_leaves_the_first_whole(tmp_path, sample_dir,
                                                                    first_build, stage):
    """Issue 27's stale model: kill -9 during a second build (another target) into a folder
    that holds a passing build. The folder must still be the first build, whole: its model,
    its artifact and the report that verified exactly those bytes; the rerun then leaves only
    what it made."""
    shutil.copytree(first_build / "cache", tmp_path / "cache")
    shutil.copytree(first_build / "out", tmp_path / "out")
    out, log = tmp_path / "out", tmp_path / "second.log"
    before = _files(out)
    args = _build(sample_dir, tmp_path / "cache", out, "coreml")
    process = start(tmp_path / "home", *args, log=log)
    wait_for_line(log, stage, process)
    _stopped(interrupt(process, signal.SIGKILL), signal.SIGKILL, log)

    assert _files(out) == before
    verified = json.loads((out / "report.json").read_text())["files"]
    assert [entry["name"] for entry in verified] == ["model_float32.tflite"]
    assert verified[0]["verdict"] == "passed"
    assert leftovers(tmp_path / "out") == [] and leftovers(tmp_path) != []  # the dead stage

    if "conversion" not in stage:
        return  # one rerun shows the sweep (a whole build: seconds the suite spends once)
    rerun = run(tmp_path / "home", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not (out / "model_float32.tflite").exists()  # the first build's, made from its model
    assert (out / "model_float32.mlmodel").is_file()
    assert leftovers(tmp_path) == []  # the rerun swept the killed build's stage


def test_two_builds_into_one_folder_one_is_refused(tmp_path, sample_dir):
    """The second build while the first writes: refused in one line naming the first."""
    out, log = tmp_path / "out", tmp_path / "first.log"
    first = start(tmp_path / "home", *_build(sample_dir, tmp_path / "cache", out, "coreml"),
                  log=log)
    try:
        wait_for_line(log, "training the last layer for", first)
        second = run(tmp_path / "home", *_build(sample_dir, tmp_path / "cache2", out, "coreml"))
    finally:
        interrupt(first, signal.SIGKILL)
    assert second.returncode == 2
    no_traceback(second)
    errors = [line for line in second.stderr.splitlines() if line.startswith("toolchain: error")]
    assert errors == [f"toolchain: error: another toolchain build (pid {first.pid} on "
                      f"{socket.gethostname()}, since {errors[0].split('since ')[1]}"], errors
    assert errors[0].endswith(f") is writing {out}")
    assert not (tmp_path / "cache2").exists()  # refused before any work
