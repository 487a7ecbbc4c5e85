"""The retrained model on disk (``toolchain.model``): ``split.json`` is read in one place, as a
file from a stranger, for the verifier's held-out set and the converter's calibration images."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from toolchain import model as model_io
from toolchain.conversion import source_from_model
from toolchain.dataset import scan
from toolchain.errors import ModelError, UnsafeModel
from toolchain.heldout import held_out
from toolchain.untrusted import LIMITS


def _write(folder, record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / model_io.SPLIT_FILE).write_text(json.dumps(record), encoding="utf-8")


def test_a_split_reads_back_as_the_dataset_recorded_it(sample_dir, tmp_path):
    dataset = scan(sample_dir)
    _write(tmp_path, dataset.record())
    split = model_io.read_split(tmp_path)
    assert (split.validation_percentage, split.testing_percentage) == (
        dataset.split.validation_percentage, dataset.split.testing_percentage)
    for name in ("training", "validation", "testing"):
        assert split.images(name) == tuple(entry.path.resolve() for entry in
                                           dataset.subset(name))
    moved = tmp_path / "moved"
    shutil.copytree(sample_dir, moved)
    assert split.images("testing", moved) == tuple(moved / entry.relpath
                                                   for entry in dataset.subset("testing"))


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["sets"]["training"].append("/etc/passwd"), "'/etc/passwd' in its training set"),
    (lambda r: r["sets"]["validation"].append("../../secret.jpg"),
     "'../../secret.jpg' in its validation set"),
    (lambda r: r["sets"]["testing"].append(7), "7 in its testing set"),
    (lambda r: r["sets"].update(training="a.jpg"), "its training set is not a list"),
    (lambda r: r.pop("testing_percentage"), "it has no testing_percentage"),
    (lambda r: r.update(validation_percentage="ten"), "could not convert string to float"),
    (lambda r: r.pop("sets"), "not a split record"),
], ids=["absolute path", "parent folder", "not a path", "set not a list", "no percentage",
        "percentage not a number", "no sets"])
def test_a_hostile_or_broken_split_is_one_line_naming_the_file(sample_dir, tmp_path, change,
                                                                message):
    record = scan(sample_dir).record()
    change(record)
    _write(tmp_path, record)
    with pytest.raises(ModelError) as raised:
        model_io.read_split(tmp_path)
    assert str(tmp_path / "split.json") in str(raised.value)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_split_that_is_not_json_or_too_large_is_refused(tmp_path):
    (tmp_path / "split.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot read the split of"):
        model_io.read_split(tmp_path)
    (tmp_path / "split.json").write_bytes(b" " * (LIMITS.split_bytes + 1))
    with pytest.raises(UnsafeModel, match="more than the limit"):
        model_io.read_split(tmp_path)


@pytest.mark.slow
def test_the_converter_warns_and_the_verifier_refuses_a_split_naming_outside_files(
        retrained, sample_dir, tmp_path, toolchain_log):
    """The converter can convert without calibration images, so it warns and uses none; the
    verifier cannot know its held-out set, so it refuses, with what to do instead."""
    folder = tmp_path / "model"
    shutil.copytree(retrained.output_dir, folder)
    record = json.loads((folder / "split.json").read_text(encoding="utf-8"))
    record["sets"]["training"].append("/etc/passwd")
    _write(folder, record)
    source = source_from_model(folder)
    assert source.calibration == () and source.tuning == ()
    warned = [r.getMessage() for r in toolchain_log.records if r.levelno == logging.WARNING]
    assert any("'/etc/passwd' in its training set" in line and
               "no calibration images are known" in line for line in warned), warned
    with pytest.raises(ModelError) as raised:
        held_out(sample_dir, folder)
    assert "'/etc/passwd' in its training set" in str(raised.value)
    assert "--images DIR" in raised.value.hint
