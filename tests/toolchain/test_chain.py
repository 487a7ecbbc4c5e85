"""Tests for ``toolchain build``'s folder (``toolchain.chain``): one consistent unit, one writer.

A build writes into a hidden sibling and swaps it in at the end, so a folder's model, artifacts
and reports always come from one run; a folder holding anything else is refused before the
work; a second writer is refused naming the first. What a kill -9 at each stage leaves is in
tests/reliability/test_interruptions.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_ARCH, leftovers
from toolchain import atomic
from toolchain.cli import main
from toolchain.errors import WriteError


def _build(sample_dir: Path, cache: Path, out: Path, *target: str) -> list[str]:
    return ["build", "--image-dir", str(sample_dir), "--architecture", TINY_ARCH, "--weights",
            "none", "--bottleneck-dir", str(cache), "--output-dir", str(out),
            "--how-many-training-steps", "20", *target, "--quiet", "--accept-small-set"]


def _error(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("toolchain: error: ")]
    return line


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_second_build_leaves_only_what_it_made(tmp_path, sample_dir, session_cache, capsys):
    """The stale model of issue 27: a build with the TFLite target, then one with Core ML into
    the same folder; the first's .tflite (made from the previous model) must not survive."""
    out = tmp_path / "out"
    tflite = ["--target", "tflite", "--tflite-variant", "float32"]
    assert main(_build(sample_dir, session_cache, out, *tflite)) == 0, capsys.readouterr()
    assert (out / "model_float32.tflite").is_file()
    first_model = (out / "model" / "model.json").read_bytes()

    assert main(_build(sample_dir, session_cache, out, "--target", "coreml",
                       "--how-many-training-steps", "30")) == 0, capsys.readouterr()
    assert sorted(path.name for path in out.iterdir()) == [
        "confusion", "junit.xml", "labels.txt", "model", "model_float32.mlmodel", "report.json",
        "report.md"]
    assert (out / "model" / "model.json").read_bytes() != first_model
    report = json.loads((out / "report.json").read_text())
    assert [entry["name"] for entry in report["files"]] == ["model_float32.mlmodel"]
    # The report names the files where they are, not where they were staged.
    assert Path(report["model"]) == (out / "model").absolute()
    assert {Path(row["path"]).parent for row in report["artifacts"]} == {out.absolute()}
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_build_that_fails_half_way_leaves_the_previous_one_whole(
        tmp_path, sample_dir, session_cache, capsys, monkeypatch):
    """Here the verifier fails after the model and the artifact were written (in the stage)."""
    out = tmp_path / "out"
    assert main(_build(sample_dir, session_cache, out, "--target", "tflite",
                       "--tflite-variant", "float32")) == 0, capsys.readouterr()
    before = _tree(out)

    def broken(*args, **kwargs):
        raise WriteError("simulated: the disk filled up while verifying")

    monkeypatch.setattr("toolchain.chain.verify", broken)
    assert main(_build(sample_dir, session_cache, out, "--target", "coreml",
                       "--how-many-training-steps", "30")) == 2
    assert "simulated: the disk filled up" in capsys.readouterr().err
    assert _tree(out) == before
    assert leftovers(tmp_path) == []  # the stage went with the failure


def test_a_folder_holding_other_files_is_refused_before_the_work(tmp_path, sample_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(_build(sample_dir, tmp_path / "cache", out, "--target", "coreml"))
    err = capsys.readouterr().err
    assert code == 2
    assert _error(err) == (f"toolchain: error: {out.absolute()} holds 1 file(s) a build did not "
                                   "make (first: notes.txt); a build replaces its folder whole")
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "cache").exists()
    # The same for a bottleneck cache inside the build folder: the swap would take it away.
    code = main(_build(sample_dir, tmp_path / "fresh" / "cache", tmp_path / "fresh",
                       "--target", "coreml"))
    assert code == 2
    assert "is inside the build folder" in capsys.readouterr().err


def test_a_second_build_into_a_busy_folder_is_refused(tmp_path, sample_dir, capsys):
    out = tmp_path / "out"
    with atomic.exclusive(out, "build"):  # as another process would hold it
        code = main(_build(sample_dir, tmp_path / "cache", out, "--target", "coreml"))
    err = capsys.readouterr().err
    assert code == 2
    assert _error(err).startswith(
        f"toolchain: error: another toolchain build (pid {os.getpid()} on "), err
    assert f"is writing {out.absolute()}" in err and not out.exists()


_KILLED_SWAP = """
import os, sys
from pathlib import Path
from toolchain import chain

calls = []
real = os.replace
def replace(src, dst):
    calls.append(dst)
    real(src, dst)
    if len(calls) == 1:
        os._exit(9)  # killed between moving the previous build away and moving the new one in
os.replace = replace
chain._swap(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_a_swap_killed_half_way_gives_the_previous_build_back(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "report.json").write_text("previous")
    stage = tmp_path / f".out.{atomic._owner()}.staged.tmp"
    stage.mkdir()
    (stage / "report.json").write_text("new")
    done = subprocess.run([sys.executable, "-c", _KILLED_SWAP, str(stage), str(final)])
    assert done.returncode == 9 and not final.exists()
    assert atomic.sweep(tmp_path) >= 1  # what the next build does first
    assert (final / "report.json").read_text() == "previous"


@pytest.mark.slow
def test_a_build_verifies_on_a_folder_large_enough_to_tell(tmp_path, sample_dir, session_cache,
                                                          capsys):
    """--verify-images: the held-out split of the sample photos (6) cannot show 0.95; every
    photo of another folder can (40 would), with no labels. Without --accept-small-set the
    verdict is conclusive."""
    photos = tmp_path / "check"
    photos.mkdir()
    for index, path in enumerate(sorted(sample_dir.glob("*/*.jpg"))):
        (photos / f"{index:03d}.jpg").write_bytes(path.read_bytes())  # loose: unlabelled
    argv = [token for token in _build(sample_dir, session_cache, tmp_path / "out", "--target",
                                      "tflite", "--tflite-variant", "float32",
                                      "--float32-agreement", "0.95")
            if token != "--accept-small-set"]
    assert index + 1 >= 40
    assert main([*argv, "--verify-images", str(photos)]) == 0, capsys.readouterr()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verdict"] == "passed" and report["accept_small_set"] is False
    assert (report["held_out_from"], report["held_out_images"]) == ("folder", index + 1)
    assert report["labelled"] is False and report["image_dir"] == str(photos)
    assert {row["status"] for row in report["artifacts"] if row["input"] == "resized"} == {
        "passed"}


def test_a_verify_folder_without_photos_is_refused_before_the_work(tmp_path, sample_dir,
                                                                   capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    code = main([*_build(sample_dir, tmp_path / "cache", tmp_path / "out", "--target", "tflite"),
                 "--verify-images", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2
    assert _error(err) == f"toolchain: error: {tmp_path / 'empty'} holds no readable images"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
