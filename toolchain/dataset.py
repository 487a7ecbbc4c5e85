"""The image folder: class labels, the image list, and a stable train/validation/test split.

Layout (TensorFlow for Poets): ``IMAGE_DIR/<label>/<images>``. Labels are the folder names as
written (UTF-8), in sorted order. The split of each image is decided by a hash of its path
relative to the image folder, as retrain.py did (including its ``_nohash_`` convention: every
file whose name differs only after ``_nohash_`` lands in the same set). Moving the folder or
adding images never moves an existing image between sets, so the held-out set stays held out.

Files that are not images are skipped with a warning and listed in :attr:`Dataset.skipped`;
the scan only reads headers, and files that fail to decode later are added by the caller.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from toolchain.errors import DatasetError, UnreadableImage, UsageError
from toolchain.options import Options, option
from toolchain.untrusted import hidden, shown

log = logging.getLogger("toolchain")

SUBSETS = ("training", "validation", "testing")
# retrain.py's constant: the hash is taken modulo this, so percentages are stable for ever.
_MAX_NUM_IMAGES_PER_CLASS = 2**27 - 1


@dataclass(frozen=True, kw_only=True)
class SplitOptions(Options):
    """Percentages of each class held out for validation and testing (retrain.py's defaults)."""

    validation_percentage: float = option(10.0, "percent of each class held out for validation")
    testing_percentage: float = option(10.0, "percent of each class held out for testing, "
                                             "never trained on: the verifier's held-out set")

    def validate(self) -> None:
        for name in ("validation_percentage", "testing_percentage"):
            value = getattr(self, name)
            if not 0 <= value < 100:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 100), got {value}")
        if self.validation_percentage + self.testing_percentage >= 100:
            raise UsageError("validation and testing percentages leave no training images",
                             hint="keep --validation-percentage + --testing-percentage below 100")


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """One usable image: where it is, its label and which set it belongs to."""

    path: Path
    relpath: str
    label: str
    label_index: int
    subset: str


@dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Dataset:
    """The scanned image folder. Immutable: :meth:`without` returns a new one."""

    root: Path
    labels: tuple[str, ...]
    entries: tuple[ImageEntry, ...]
    skipped: tuple[Skipped, ...]
    split: SplitOptions = field(default_factory=SplitOptions)

    def subset(self, name: str) -> list[ImageEntry]:
        """The images of one set (``training``, ``validation`` or ``testing``)."""
        if name not in SUBSETS:
            raise ValueError(name)
        return [entry for entry in self.entries if entry.subset == name]

    def without(self, failures: dict[Path, str]) -> Dataset:
        """This dataset minus images that failed to decode, which join the skipped list."""
        if not failures:
            return self
        kept = tuple(entry for entry in self.entries if entry.path not in failures)
        extra = tuple(Skipped(str(path), reason) for path, reason in failures.items())
        return Dataset(self.root, self.labels, kept, self.skipped + extra, self.split)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per label and set, for the record and for warnings."""
        table = {label: dict.fromkeys(SUBSETS, 0) for label in self.labels}
        for entry in self.entries:
            table[entry.label][entry.subset] += 1
        return table

    def record(self) -> dict:
        """The split as JSON-ready data, written to the output directory."""
        return {
            "image_dir": str(self.root.resolve()),
            "validation_percentage": self.split.validation_percentage,
            "testing_percentage": self.split.testing_percentage,
            "method": "sha1 of the NFC path relative to image_dir, _nohash_ suffix ignored",
            "labels": list(self.labels),
            "sets": {name: [entry.relpath for entry in self.subset(name)] for name in SUBSETS},
            "skipped": [{"path": item.path, "reason": item.reason} for item in self.skipped],
        }


def which_set(relpath: str, split: SplitOptions) -> str:
    """The set an image belongs to, from a hash of its relative path (stable for ever)."""
    head, _, name = relpath.rpartition("/")
    name = re.sub(r"_nohash_.*$", "", name)
    key = unicodedata.normalize("NFC", f"{head}/{name}" if head else name)
    hashed = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16)
    percentage = (hashed % (_MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / _MAX_NUM_IMAGES_PER_CLASS)
    if percentage < split.validation_percentage:
        return "validation"
    if percentage < split.validation_percentage + split.testing_percentage:
        return "testing"
    return "training"


def _sniff(path: Path) -> str | None:
    """Why ``path`` is not a usable image, reading only its header; None when it looks fine."""
    from toolchain.images import probe

    try:
        probe(path)
    except UnreadableImage as error:
        return error.reason
    return None


def _class_files(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """Files under a class folder, sorted. Folder symlinks are listed as skipped, not followed
    (they can loop); unreadable sub-folders are listed as skipped too."""
    found = []

    def unreadable(error: OSError) -> None:
        skipped.append(Skipped(str(error.filename), f"cannot list folder: {error.strerror}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=False):
        for name in sorted(dirnames):
            if not name.startswith(".") and os.path.islink(os.path.join(dirpath, name)):
                skipped.append(Skipped(os.path.join(dirpath, name),
                                       "symbolic link to a folder (not followed)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d)))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    return found


def _children(root: Path) -> list[Path]:
    try:
        return sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as error:
        raise DatasetError(f"cannot list image folder {root}: {error.strerror}") from error


def scan(image_dir: Path, split: SplitOptions = SplitOptions()) -> Dataset:
    """Scan ``image_dir``: one sub-folder per class. Raises DatasetError if unusable."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder",
                           hint="pass --image-dir with one sub-folder of images per class")
    skipped: list[Skipped] = []
    per_label: dict[str, list[Path]] = {}
    resolved_root = root.resolve()
    for child in _children(root):
        if child.name.startswith("."):
            if child.is_dir() and not child.is_symlink():  # a class hidden by its name
                skipped.append(Skipped(str(child), "hidden folder (its name starts with a dot); "
                                                   "rename it to make it a class"))
            continue
        if not child.is_dir():
            skipped.append(Skipped(str(child), "not inside a class folder"))
            continue
        if child.is_symlink() and resolved_root.is_relative_to(child.resolve()):
            skipped.append(Skipped(str(child), "symbolic link to the image folder or above it"))
            continue
        if any(hidden(char) for char in child.name):
            skipped.append(Skipped(str(child), "class folder name contains a control character "
                                               "(a line break, an escape sequence): it cannot "
                                               "be a label"))
            continue
        usable = _usable(_class_files(child, skipped), skipped)
        if usable:
            per_label[child.name] = usable
        else:
            log.warning("class folder %s has no usable images; ignoring it", shown(str(child)))
    for item in skipped:
        log.warning("skipping %s: %s", shown(item.path), item.reason)
    _refuse_lookalikes(root, per_label)

    labels = tuple(sorted(per_label))
    if len(labels) < 2:
        raise DatasetError(
            f"{root} has {len(labels)} usable class folder(s); at least 2 are needed",
            hint="put the images of each class in its own sub-folder of --image-dir")
    entries = []
    for index, label in enumerate(labels):
        for path in per_label[label]:
            relpath = path.relative_to(root).as_posix()
            entries.append(ImageEntry(path, relpath, label, index, which_set(relpath, split)))
    dataset = Dataset(root, labels, tuple(entries), tuple(skipped), split)
    for label, counts in dataset.counts().items():
        if counts["training"] == 0:
            log.warning("class '%s' has no training images (%d in total); add more images",
                        shown(label), sum(counts.values()))
    return dataset


def _refuse_lookalikes(root: Path, labels) -> None:
    """Two class folders whose names differ only in Unicode normalisation (``café`` typed on
    Linux, NFC, and copied from an older Mac, NFD) would be two classes that look identical in
    every app and report: a DatasetError naming both, written so the difference shows."""
    seen: dict[str, str] = {}
    for label in sorted(labels):
        key = unicodedata.normalize("NFC", label)
        if key in seen:
            raise DatasetError(f"class folders {ascii(seen[key])} and {ascii(label)} in "
                               f"{shown(str(root))} differ only in how their letters are encoded "
                               "(Unicode NFC and NFD), so they would look like one class",
                               hint="merge them into one folder")
        seen[key] = label


def _usable(paths, skipped: list[Skipped]) -> list[Path]:
    """The paths whose header is an image; the others appended to ``skipped`` with the reason."""
    usable = []
    for path in paths:
        reason = _sniff(path)
        if reason is None:
            usable.append(path)
        else:
            skipped.append(Skipped(str(path), reason))
    return usable


def find_images(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Every usable image anywhere under ``folder`` (sorted, headers only), and what was not.

    For the verifier's ``--images``: a folder of photos with or without class folders. The same
    walk and the same header checks as :func:`scan`; each skipped file is logged once."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    skipped: list[Skipped] = []
    usable = _usable(_class_files(root, skipped), skipped)
    for item in skipped:
        log.warning("skipping %s: %s", shown(item.path), item.reason)
    return usable, skipped


def labels_text(labels) -> str:
    """The ``labels.txt`` format: one label per line, in output order, each line ended."""
    return "".join(f"{label}\n" for label in labels)


def parse_labels(text: str) -> tuple[str, ...]:
    """Labels from ``labels.txt`` text; Windows line ends and trailing blank lines ignored."""
    labels = tuple(line.rstrip("\r") for line in text.split("\n"))
    while labels and labels[-1] == "":
        labels = labels[:-1]
    return labels


def read_labels(path: Path) -> tuple[str, ...]:
    """Read a ``labels.txt`` (one label per line, UTF-8), within the limits on labels
    (``toolchain.untrusted``): it may come with a stranger's graph."""
    from toolchain.untrusted import LIMITS, check_labels
    from toolchain.untrusted.files import read_limited

    try:  # Notepad writes a byte-order mark
        text = read_limited(Path(path), LIMITS.packed_file_bytes, "labels file").decode(
            "utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read labels file {shown(str(path))}: {error}") from error
    return check_labels(parse_labels(text), str(path))


__all__ = ["SUBSETS", "Dataset", "ImageEntry", "Skipped", "SplitOptions", "scan", "which_set",
           "find_images",
           "read_labels", "labels_text", "parse_labels"]
