"""The verifier's images from any folder (``toolchain.heldout.images_in``): labelled when its
class folders are all the original's labels, unlabelled otherwise (said in one line), every
unreadable file left out by name."""

from __future__ import annotations

import shutil

import pytest

from toolchain.errors import DatasetError
from toolchain.heldout import FOLDER, images_in

LABELS = ("desert", "forest", "snowfield")


def _photos(sample_dir, folder, layout):
    """Copy two sample photos per class into ``folder`` as ``layout(label, name)`` says."""
    for label in LABELS:
        for path in sorted((sample_dir / label).iterdir())[:2]:
            target = folder / layout(label, path.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return folder


def test_class_folders_named_after_the_labels_are_labelled(sample_dir, tmp_path):
    folder = _photos(sample_dir, tmp_path / "photos", lambda label, name: f"{label}/{name}")
    held = images_in(folder, LABELS + ("unused label",))
    assert held.labelled and held.source == FOLDER and len(held) == 6
    assert [(entry.label, entry.label_index) for entry in held.entries][:2] == [("desert", 0)] * 2
    assert held.unlabelled_because == ""


def test_nested_folders_take_the_top_level_folder_as_label(sample_dir, tmp_path):
    folder = _photos(sample_dir, tmp_path / "photos",
                     lambda label, name: f"{label}/2024/trip/{name}")
    held = images_in(folder, LABELS)
    assert held.labelled and {entry.label for entry in held.entries} == set(LABELS)


@pytest.mark.parametrize("layout, because", [
    (lambda label, name: name, "6 image(s) are not in a class folder"),
    (lambda label, name: f"{label}/{name}" if label != "snowfield" else name,
     "2 image(s) are not in a class folder"),
    (lambda label, name: f"{label.upper()}/{name}", "are not labels of the model"),
], ids=["flat", "some-loose", "unknown-classes"])
def test_anything_else_is_unlabelled_and_says_why(sample_dir, tmp_path, toolchain_log, layout,
                                                  because):
    folder = _photos(sample_dir, tmp_path / "photos", layout)
    held = images_in(folder, LABELS)
    assert not held.labelled and len(held) == 6
    assert because in held.unlabelled_because
    assert all(entry.label is None for entry in held.entries)
    said = [r.getMessage() for r in toolchain_log.records if "is unlabelled" in r.getMessage()]
    assert len(said) == 1 and because in said[0] and "accuracy is n/a" in said[0]


def test_unreadable_files_are_left_out_by_name(sample_dir, tmp_path, toolchain_log):
    folder = _photos(sample_dir, tmp_path / "photos", lambda label, name: name)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "empty.jpg").write_bytes(b"")
    held = images_in(folder, LABELS)
    assert len(held) == 6
    assert dict(held.unreadable) == {"empty.jpg": "empty file (0 bytes)",
                                     "notes.txt": "not an image (unrecognised content)"}
    warned = [r.getMessage() for r in toolchain_log.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and any("empty.jpg" in line for line in warned)


def test_a_folder_without_images_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no readable images"):
        images_in(tmp_path / "empty", LABELS)
    with pytest.raises(DatasetError, match="does not exist"):
        images_in(tmp_path / "absent", LABELS)
