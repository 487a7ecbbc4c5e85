"""The verifier's images: the recorded held-out split of a training folder, or any folder.

Two ways to say which photos the artifacts are checked on:

- ``--image-dir`` with a retrain or build folder (:func:`held_out`): the **testing** split of the
  folder the model was trained on, recomputed from ``split.json``'s percentages, so it is exactly
  the images training and int8 calibration never saw. Every image has its true label.
- ``--images DIR`` (:func:`images_in`): every readable image anywhere under ``DIR``, for any
  original (a frozen graph, a ``.keras`` file, a retrain folder). The folder is **labelled** when
  its images all sit in class folders whose names the original knows; each image's label is then
  its top-level folder and accuracy is reported. Otherwise (images directly in ``DIR``, or a
  class folder the model does not know) it is **unlabelled**: agreement needs no labels, and the
  report says accuracy "n/a".

Unreadable files are skipped with one warning each, naming the file, and listed in the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from toolchain import model as model_io
from toolchain.dataset import ImageEntry, SplitOptions, find_images, scan
from toolchain.errors import DatasetError, ModelError, first_line

log = logging.getLogger("toolchain")

#: ``HeldOut.source``: the recorded testing split, or every image of a folder.
SPLIT, FOLDER = "split", "folder"


@dataclass(frozen=True)
class HeldOut:
    """The held-out images, their true labels, and what was left out (with reasons).

    ``labelled`` is False for a folder without usable class folders: every entry's ``label`` is
    then None (and ``label_index`` -1), and the verifier reports agreement without accuracy."""

    entries: tuple[ImageEntry, ...]
    image_dir: Path
    unreadable: tuple[tuple[str, str], ...] = ()
    labelled: bool = True
    source: str = SPLIT
    #: Why the folder counts as unlabelled (one line for the CLI and the report), else "".
    unlabelled_because: str = ""

    def __len__(self) -> int:
        return len(self.entries)


def held_out(image_dir: Path, model_dir: Path) -> HeldOut:
    """The ``testing`` split of ``image_dir``, split as the model's training split it."""
    folder = model_io.find_dir(model_dir)
    info = model_io.load_info(folder)
    try:
        record = model_io.read_split(folder)
    except ModelError as error:
        raise ModelError(first_line(error),
                         hint="the held-out set is the split the model was trained with; "
                              "retrain to write it, or pass --images DIR to check on any "
                              "folder") from error
    split = SplitOptions(validation_percentage=record.validation_percentage,
                         testing_percentage=record.testing_percentage)
    dataset = scan(image_dir, split)
    unknown = sorted(set(dataset.labels) - set(info.labels))
    if unknown:
        raise DatasetError(f"{image_dir} has classes the model does not know: {unknown}",
                           hint=f"the model knows {list(info.labels)}; --images DIR checks "
                                "on any folder without labels")
    entries = tuple(dataset.subset("testing"))
    if not entries:
        raise DatasetError(f"{image_dir} has no held-out (testing) images",
                           hint=f"{split.testing_percentage:g}% of each class is held out; "
                                f"add images or retrain with a larger --testing-percentage")
    return HeldOut(entries, Path(image_dir))


def images_in(folder: Path, labels: tuple[str, ...]) -> HeldOut:
    """Every readable image under ``folder``; labelled by class folders when ``labels`` (the
    original's) name them all, else unlabelled (logged in one line)."""
    root = Path(folder)
    paths, skipped = find_images(root)
    if not paths:
        raise DatasetError(f"{root} holds no readable images",
                           hint="pass --images with a folder of photos (JPEG, PNG, ...)")
    relpaths = [path.relative_to(root).as_posix() for path in paths]
    order = sorted(range(len(paths)), key=lambda i: relpaths[i])
    paths, relpaths = [paths[i] for i in order], [relpaths[i] for i in order]
    loose = [rel for rel in relpaths if "/" not in rel]
    classes = sorted({rel.split("/", 1)[0] for rel in relpaths if "/" in rel})
    unknown = [name for name in classes if name not in labels]
    why = ""
    if loose:
        why = f"{len(loose)} image(s) are not in a class folder (e.g. {loose[0]})"
    elif unknown:
        why = f"its class folder(s) {unknown[:5]} are not labels of the model"
    unreadable = tuple((_relative(item.path, root), item.reason) for item in skipped)
    if why:
        log.info("%s is unlabelled: %s; agreement is measured without labels and accuracy is "
                 "n/a", root, why)
        entries = tuple(ImageEntry(path, rel, None, -1, "testing")
                        for path, rel in zip(paths, relpaths))
        return HeldOut(entries, root, unreadable, labelled=False, source=FOLDER,
                       unlabelled_because=why)
    entries = tuple(ImageEntry(path, rel, rel.split("/", 1)[0],
                               labels.index(rel.split("/", 1)[0]), "testing")
                    for path, rel in zip(paths, relpaths))
    return HeldOut(entries, root, unreadable, labelled=True, source=FOLDER)


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path
