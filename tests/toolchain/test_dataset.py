"""The image folder scan and the stable train/validation/test split (``toolchain.dataset``).

Every image is a tiny file drawn with PIL in ``tmp_path``; nothing imports TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.privileges import as_user
from toolchain.dataset import SUBSETS, Dataset, Skipped, SplitOptions, read_labels, scan, which_set
from toolchain.errors import DatasetError, ToolchainError, UnreadableImage, UsageError
from toolchain.images import load_rgb

CREME = "crème brûlée"
COMMA = "cats, dogs and more"
HELD_OUT = SplitOptions(validation_percentage=30, testing_percentage=30)


def _img(path: Path, fmt: str = "PNG", colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, fmt)
    return path


def _classes(root: Path, per_class: dict[str, int]) -> Path:
    for label, count in per_class.items():
        for index in range(count):
            _img(root / label / f"img_{index:03d}.png")
    return root


def _split(dataset: Dataset) -> dict[str, str]:
    return {entry.relpath: entry.subset for entry in dataset.entries}


def _skipped(dataset: Dataset) -> dict[str, str]:
    """Skipped files by path relative to the root, with their reasons."""
    return {Path(item.path).relative_to(dataset.root).as_posix(): item.reason
            for item in dataset.skipped}


# --- labels and files ---------------------------------------------------------------------------


def test_labels_are_folder_names_sorted(tmp_path):
    root = _classes(tmp_path / "photos", {CREME: 2, COMMA: 2, "apple": 2, "Zebra": 1})
    dataset = scan(root)
    assert dataset.labels == ("Zebra", "apple", COMMA, CREME)
    assert dataset.root == root
    for entry in dataset.entries:
        assert entry.label == entry.relpath.split("/")[0]
        assert dataset.labels[entry.label_index] == entry.label
        assert entry.path == root / entry.relpath
    assert Counter(entry.label for entry in dataset.entries) == {
        "Zebra": 1, "apple": 2, COMMA: 2, CREME: 2}


def test_labels_keep_spelling_as_written(tmp_path):
    nfd = unicodedata.normalize("NFD", CREME)
    assert nfd != CREME
    root = _classes(tmp_path / "photos", {nfd: 1, "b": 1})
    assert scan(root).labels == ("b", nfd)


def test_root_files_skipped_and_listed(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 1, "b": 1})
    _img(root / "stray.jpg", "JPEG")
    (root / "README.txt").write_text("hello")
    dataset = scan(root)
    assert _skipped(dataset) == {"README.txt": "not inside a class folder",
                                 "stray.jpg": "not inside a class folder"}
    assert {entry.relpath for entry in dataset.entries} == {"a/img_000.png", "b/img_000.png"}


def test_hidden_files_and_folders_ignored(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 2, "b": 1})
    _img(root / ".hidden_class" / "x.png")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _img(root / "a" / ".secret.png")
    (root / "a" / "._img_000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    _img(root / "a" / ".thumbnails" / "t.png")
    _img(root / "..." / "y.png")
    dataset = scan(root)
    assert dataset.labels == ("a", "b")
    assert {entry.relpath for entry in dataset.entries} == {
        "a/img_000.png", "a/img_001.png", "b/img_000.png"}
    # A folder beside the classes whose name hides it is named, not dropped in silence: it
    # looks like a class to its owner ("..." included). Hidden files and folders inside a class
    # (thumbnails, AppleDouble files) are system litter and stay unlisted.
    hidden = "hidden folder (its name starts with a dot); rename it to make it a class"
    assert _skipped(dataset) == {".hidden_class": hidden, "...": hidden}


def test_a_class_folder_named_with_control_characters_is_skipped_and_shown_escaped(
        tmp_path, caplog):
    root = _classes(tmp_path / "photos", {"a": 1, "b": 1, "\x1b[2Jred": 1, "two\nlines": 1})
    _img(root / "a" / "new\nline.png")
    with caplog.at_level(logging.WARNING, logger="toolchain"):
        dataset = scan(root)
    assert dataset.labels == ("a", "b")
    reason = ("class folder name contains a control character (a line break, an escape "
              "sequence): it cannot be a label")
    assert _skipped(dataset) == {"\x1b[2Jred": reason, "two\nlines": reason}
    messages = [record.getMessage() for record in caplog.records]
    assert all("\x1b" not in text and "\n" not in text for text in messages), messages
    assert any(f"\\x1b[2Jred: {reason}" in text for text in messages), messages
    assert {entry.relpath for entry in dataset.entries} == {"a/img_000.png", "a/new\nline.png",
                                                          "b/img_000.png"}


def test_class_folders_that_differ_only_in_unicode_normalisation_are_refused(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    root = _classes(tmp_path / "photos", {"café": 1, nfd: 1, "b": 1})
    with pytest.raises(DatasetError) as caught:
        scan(root)
    assert caught.value.message == (
        f"class folders 'cafe\\u0301' and 'caf\\xe9' in {root} differ only in how their "
        "letters are encoded (Unicode NFC and NFD), so they would look like one class")
    assert caught.value.hint == "merge them into one folder"


def test_empty_class_folder_ignored_with_warning(tmp_path, toolchain_log):
    root = _classes(tmp_path / "photos", {"a": 1, "b": 1})
    (root / "empty").mkdir()
    dataset = scan(root)
    assert dataset.labels == ("a", "b")
    warnings = [r.getMessage() for r in toolchain_log.records
                if r.name == "toolchain" and r.levelno == logging.WARNING]
    assert any(str(root / "empty") in message and "no usable images" in message
               for message in warnings), warnings


def test_folder_of_non_images_ignored(tmp_path, toolchain_log):
    root = _classes(tmp_path / "photos", {"a": 1, "b": 1})
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("not a photo")
    (root / "docs" / "data.jpg").write_text("not a photo either")
    dataset = scan(root)
    assert dataset.labels == ("a", "b")
    assert _skipped(dataset) == {"docs/data.jpg": "not an image (unrecognised content)",
                                 "docs/notes.txt": "not an image (unrecognised content)"}
    messages = " ".join(r.getMessage() for r in toolchain_log.records)
    assert "no usable images" in messages and "docs/notes.txt" in messages


@pytest.mark.parametrize("per_class", [{}, {"only": 3}, {"only": 3, "empty": 0}])
def test_fewer_than_two_classes(tmp_path, per_class):
    root = tmp_path / "photos"
    root.mkdir()
    _classes(root, per_class)
    for label in per_class:
        (root / label).mkdir(exist_ok=True)
    with pytest.raises(DatasetError) as caught:
        scan(root)
    usable = sum(1 for count in per_class.values() if count)
    assert f"has {usable} usable class folder(s); at least 2 are needed" in str(caught.value)
    assert caught.value.hint


def test_missing_image_dir(tmp_path):
    with pytest.raises(DatasetError, match="does not exist or is not a folder"):
        scan(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="does not exist or is not a folder"):
        scan(tmp_path / "file")


def _png_declaring(path: Path, width: int, height: int) -> Path:
    _img(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_unusable_files_skipped_with_reasons(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 2, "b": 2})
    (root / "a" / "empty.jpg").touch()
    (root / "a" / "notes.jpg").write_text("hello")
    (root / "a" / "list.csv").write_text("a,b\n")
    _img(root / "b" / "scan.tif", "TIFF")
    _png_declaring(root / "b" / "huge.png", 9000, 8000)
    _png_declaring(root / "b" / "bomb.png", 20000, 20000)
    os.symlink(root / "a" / "gone.png", root / "a" / "dangling.png")
    dataset = scan(root)
    skipped = _skipped(dataset)
    assert skipped.pop("a/dangling.png").startswith("cannot read (")
    assert skipped == {
        "a/empty.jpg": "empty file (0 bytes)",
        "a/notes.jpg": "not an image (unrecognised content)",
        "a/list.csv": "not an image (unrecognised content)",
        "b/scan.tif": "unsupported image format TIFF",
        "b/huge.png": "declares 9000x8000 pixels, over the 64,000,000 limit "
                      "(possible decompression bomb)",
        "b/bomb.png": "image too large (possible decompression bomb)",
    }
    assert len(dataset.entries) == 4
    assert all(isinstance(item, Skipped) for item in dataset.skipped)


def test_unreadable_file_skipped(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 2, "b": 1})
    secret = root / "a" / "img_001.png"
    secret.chmod(0)
    try:
        with as_user():  # as root too: without the power to ignore file modes
            dataset = scan(root)
        assert _skipped(dataset) == {"a/img_001.png": "permission denied"}
        assert set(_split(dataset)) == {"a/img_000.png", "b/img_000.png"}
    finally:
        secret.chmod(0o644)


def test_truncated_jpeg_passes_scan_and_is_removed_by_without(tmp_path):
    """The scan reads headers only: a truncated JPEG with an intact header is listed as usable.

    It fails when decoded; the caller then removes it with ``Dataset.without``.
    """
    root = _classes(tmp_path / "photos", {"a": 2, "b": 2})
    rng = np.random.default_rng(0)
    path = root / "a" / "half.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    dataset = scan(root)
    assert "a/half.jpg" in _split(dataset)
    assert dataset.skipped == ()

    failures = {}
    for entry in dataset.entries:
        try:
            load_rgb(entry.path, 8)
        except UnreadableImage as error:
            failures[entry.path] = error.reason
    assert list(failures) == [path]
    assert failures[path].startswith("corrupt or truncated image")

    cleaned = dataset.without(failures)
    assert "a/half.jpg" not in _split(cleaned)
    assert cleaned.skipped == (Skipped(str(path), failures[path]),)
    assert len(cleaned.entries) == 4
    assert "a/half.jpg" in _split(dataset)  # immutable: the original is unchanged


def test_nested_folders_belong_to_their_class(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 1, "b": 1})
    _img(root / "a" / "2019" / "summer" / "beach.jpg", "JPEG")
    _img(root / "a" / "2020" / "x.png")
    dataset = scan(root)
    assert dataset.labels == ("a", "b")
    labels = {entry.relpath: entry.label for entry in dataset.entries}
    assert labels == {"a/img_000.png": "a", "a/2019/summer/beach.jpg": "a",
                      "a/2020/x.png": "a", "b/img_000.png": "b"}


def test_symlink_loop_inside_class(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 2, "b": 1})
    os.symlink(root / "a", root / "a" / "loop")       # a/loop -> a
    os.symlink("..", root / "b" / "up")                 # b/up -> photos
    dataset = scan(root)
    assert dataset.labels == ("a", "b")
    assert set(_split(dataset)) == {"a/img_000.png", "a/img_001.png", "b/img_000.png"}


# --- split stability ----------------------------------------------------------------------------


def test_which_set_depends_only_on_relative_path():
    paths = [f"label/img_{i}.jpg" for i in range(300)]
    first = [which_set(p, HELD_OUT) for p in paths]
    split = SplitOptions(validation_percentage=30, testing_percentage=30)
    assert first == [which_set(p, split) for p in paths]
    assert set(first) == set(SUBSETS)
    # The label folder is part of the path: the split is per relative path, not per file name.
    others = [which_set(p.replace("label/", "other/"), HELD_OUT) for p in paths]
    assert others != first


def test_moving_the_folder_keeps_the_split(tmp_path):
    root = _classes(tmp_path / "one" / "photos", {"a": 30, "b": 30})
    before = scan(root, HELD_OUT)
    assert {e.subset for e in before.entries} == set(SUBSETS)
    moved = tmp_path / "elsewhere" / "deeper" / "pics"
    moved.parent.mkdir(parents=True)
    shutil.move(str(root), str(moved))
    after = scan(moved, HELD_OUT)
    assert _split(after) == _split(before)
    assert after.record()["sets"] == before.record()["sets"]


def test_adding_images_does_not_move_existing_ones(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 20, "b": 20})
    before = _split(scan(root, HELD_OUT))
    for index in range(20, 60):
        _img(root / "a" / f"img_{index:03d}.png")
        _img(root / "c" / f"new_{index:03d}.png")
    after = _split(scan(root, HELD_OUT))
    assert len(after) == len(before) + 80
    assert {path: after[path] for path in before} == before


def test_nohash_files_share_a_set(tmp_path):
    split = HELD_OUT
    sets = set()
    for i in range(100):
        group = {which_set(f"a/person{i}_nohash_{k}.wav.png", split) for k in range(5)}
        assert len(group) == 1
        assert group == {which_set(f"a/person{i}", split)}  # everything from _nohash_ is cut
        sets |= group
    assert sets == set(SUBSETS)  # the groups themselves are spread over the sets
    # Through the scan too.
    root = tmp_path / "photos"
    for i in range(12):
        for k in range(3):
            _img(root / "a" / f"p{i}_nohash_{k}.png")
    _img(root / "b" / "x.png")
    by_group = {}
    for entry in scan(root, split).entries:
        by_group.setdefault(entry.relpath.split("_nohash_")[0], set()).add(entry.subset)
    assert all(len(subsets) == 1 for subsets in by_group.values()), by_group


def test_nohash_prefix_decides(tmp_path):
    assert which_set("a/x_nohash_1.png", HELD_OUT) == which_set("a/x", HELD_OUT)
    # Only the file name is cut: a folder called _nohash_ does not merge its files.
    names = [f"a/d_nohash_/f{i}.png" for i in range(50)]
    assert len({which_set(name, HELD_OUT) for name in names}) > 1


def test_nfc_and_nfd_spellings_share_a_set(tmp_path):
    words = [f"{w}{i}" for i in range(40) for w in ("café", "crème", "Ångström", "naïve")]
    for word in words:
        nfc = f"{CREME}/{word}.jpg"
        nfd = unicodedata.normalize("NFD", nfc)
        assert nfc != nfd
        assert which_set(nfc, HELD_OUT) == which_set(nfd, HELD_OUT)
    # The same through two scans, one of a folder spelled as macOS writes it (NFD).
    for form, name in (("NFC", "nfc"), ("NFD", "nfd")):
        for word in words[:30]:
            _img(tmp_path / name / unicodedata.normalize(form, f"{CREME}/{word}.png"))
        _img(tmp_path / name / "other" / "x.png")
    nfc_split = _split(scan(tmp_path / "nfc", HELD_OUT))
    nfd_split = _split(scan(tmp_path / "nfd", HELD_OUT))
    assert set(nfc_split) != set(nfd_split)  # the paths really are spelled differently
    assert {unicodedata.normalize("NFC", p): s for p, s in nfd_split.items()} == nfc_split


@pytest.mark.parametrize("validation, testing", [(10, 10), (25, 15), (0, 30), (30, 0), (5, 40)])
def test_percentages_roughly_respected(validation, testing):
    split = SplitOptions(validation_percentage=validation, testing_percentage=testing)
    paths = [f"class{i % 7}/IMG_{i:05d}.jpg" for i in range(2000)]
    counts = Counter(which_set(path, split) for path in paths)
    assert abs(100 * counts["validation"] / 2000 - validation) <= 3, counts
    assert abs(100 * counts["testing"] / 2000 - testing) <= 3, counts
    assert sum(counts.values()) == 2000


def test_zero_percentages_give_all_training(tmp_path):
    split = SplitOptions(validation_percentage=0, testing_percentage=0)
    assert {which_set(f"c/{i}.jpg", split) for i in range(2000)} == {"training"}
    dataset = scan(_classes(tmp_path / "photos", {"a": 10, "b": 10}), split)
    assert len(dataset.subset("training")) == 20
    assert dataset.subset("validation") == dataset.subset("testing") == []


def test_default_split_is_ten_ten():
    assert SplitOptions() == SplitOptions(validation_percentage=10.0, testing_percentage=10.0)


@pytest.mark.parametrize("validation, testing", [
    (-1, 10), (10, -0.5), (100, 0), (0, 100), (150, 0), (60, 40), (50, 50.0), (99, 1),
    (float("nan"), 10), (10, float("nan")),
])
def test_split_options_rejected(validation, testing):
    with pytest.raises(UsageError):
        SplitOptions(validation_percentage=validation, testing_percentage=testing)


def test_split_options_messages():
    with pytest.raises(UsageError, match="--validation-percentage must be in"):
        SplitOptions(validation_percentage=-1, testing_percentage=10)
    with pytest.raises(UsageError, match="--testing-percentage must be in"):
        SplitOptions(validation_percentage=10, testing_percentage=100)
    with pytest.raises(UsageError, match="leave no training images") as caught:
        SplitOptions(validation_percentage=60, testing_percentage=40)
    assert isinstance(caught.value, ToolchainError) and caught.value.hint


@pytest.mark.parametrize("validation, testing", [(0, 0), (0, 99.5), (99.5, 0), (49.9, 50)])
def test_split_options_accepted(validation, testing):
    split = SplitOptions(validation_percentage=validation, testing_percentage=testing)
    assert (split.validation_percentage, split.testing_percentage) == (validation, testing)


# --- Dataset ------------------------------------------------------------------------------------


def test_without_moves_failures_into_skipped(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 3, "b": 3})
    (root / "stray.txt").write_text("x")
    dataset = scan(root)
    assert dataset.without({}) is dataset
    broken = root / "a" / "img_001.png"
    cleaned = dataset.without({broken: "corrupt or truncated image (boom)"})
    assert broken not in {entry.path for entry in cleaned.entries}
    assert len(cleaned.entries) == len(dataset.entries) - 1
    assert cleaned.skipped == dataset.skipped + (
        Skipped(str(broken), "corrupt or truncated image (boom)"),)
    assert (cleaned.root, cleaned.labels, cleaned.split) == (dataset.root, dataset.labels,
                                                             dataset.split)
    assert len(dataset.entries) == 6  # unchanged


def test_record_holds_every_image_exactly_once(tmp_path):
    root = _classes(tmp_path / "photos", {"a": 25, "b": 25, CREME: 10})
    (root / "stray.txt").write_text("x")
    dataset = scan(root, HELD_OUT)
    record = dataset.record()
    json.dumps(record)  # JSON-ready
    assert record["labels"] == ["a", "b", CREME]
    assert (record["validation_percentage"], record["testing_percentage"]) == (30, 30)
    assert record["image_dir"] == str(root)
    listed = [path for name in SUBSETS for path in record["sets"][name]]
    assert len(listed) == len(set(listed)) == 60
    assert set(listed) == {entry.relpath for entry in dataset.entries}
    for name in SUBSETS:
        assert record["sets"][name] == [e.relpath for e in dataset.entries if e.subset == name]
        assert record["sets"][name]  # all three sets are used with 30/30 over 60 images
    assert record["skipped"] == [{"path": str(root / "stray.txt"),
                                  "reason": "not inside a class folder"}]


def test_counts_and_subset(tmp_path):
    dataset = scan(_classes(tmp_path / "photos", {"a": 20, "b": 5}), HELD_OUT)
    counts = dataset.counts()
    assert set(counts) == {"a", "b"}
    assert sum(counts["a"].values()) == 20 and sum(counts["b"].values()) == 5
    for name in SUBSETS:
        assert len(dataset.subset(name)) == counts["a"][name] + counts["b"][name]
    with pytest.raises(ValueError):
        dataset.subset("train")


# --- labels file --------------------------------------------------------------------------------


def test_read_labels_round_trip(tmp_path):
    labels = ("apple", COMMA, CREME, "日本語", " padded ")
    path = tmp_path / "labels.txt"
    path.write_bytes("".join(f"{label}\n" for label in labels).encode("utf-8"))
    assert read_labels(path) == labels
    path.write_bytes("\n".join(labels).encode("utf-8"))  # no trailing newline
    assert read_labels(path) == labels
    path.write_bytes("".join(f"{label}\r\n" for label in labels).encode("utf-8") + b"\n\n")
    assert read_labels(path) == labels


def test_read_labels_of_scanned_dataset(tmp_path):
    dataset = scan(_classes(tmp_path / "photos", {CREME: 1, COMMA: 1, "x": 1}))
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"{label}\n" for label in dataset.labels), encoding="utf-8")
    assert read_labels(path) == dataset.labels


def test_read_labels_errors(tmp_path):
    with pytest.raises(DatasetError, match="cannot read labels file"):
        read_labels(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("crème\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="cannot read labels file"):
        read_labels(bad)


def test_folder_symlinks_inside_a_class_are_listed_as_skipped(tmp_path):
    root = tmp_path / "photos"
    _img(root / "a" / "1.png")
    _img(root / "b" / "1.png")
    _img(tmp_path / "elsewhere" / "2.png")
    os.symlink(tmp_path / "elsewhere", root / "a" / "linked")
    dataset = scan(root)
    assert [e.relpath for e in dataset.entries] == ["a/1.png", "b/1.png"]
    assert Skipped(str(root / "a" / "linked"), "symbolic link to a folder (not followed)") \
        in dataset.skipped


def test_class_symlink_to_the_image_folder_is_not_a_class(tmp_path):
    root = tmp_path / "photos"
    _img(root / "a" / "1.png")
    _img(root / "b" / "1.png")
    os.symlink(root, root / "loop")
    dataset = scan(root)
    assert dataset.labels == ("a", "b")
    assert any(s.path == str(root / "loop") and "symbolic link" in s.reason
               for s in dataset.skipped)


def test_unlistable_image_folder_is_a_dataset_error(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    root.mkdir()

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DatasetError, match="cannot list image folder"):
        scan(root)


def test_read_labels_ignores_a_byte_order_mark(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffcrème brûlée\ndaisy\n".encode("utf-8"))
    assert read_labels(path) == ("crème brûlée", "daisy")
