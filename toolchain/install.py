"""``toolchain install``: drop a built model into a sample app, at the one place the app reads.

- iOS: ``sample_apps/ios/ImageClassifier/Model/ImageClassifier.mlmodel`` (or ``.mlpackage``);
  Xcode compiles either into ``ImageClassifier.mlmodelc``, which the app loads by name. Only one
  of the two may exist (both would compile to the same name), so the other is removed.
- Android: ``sample_apps/android/app/src/main/assets/model.tflite``, opened by the TFLite Task
  Library's ``ImageClassifier``.

The apps read the labels (and, on Android, the normalisation) from the model itself, so a model
without them is refused here, in one line, rather than failing on a phone. The copy is atomic:
an interrupted install leaves the previous model in place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from toolchain import atomic
from toolchain.errors import ModelError, UsageError

APPS = ("ios", "android")
#: Where each app reads its model, relative to the sample apps folder.
IOS_MODEL_DIR = Path("ios/ImageClassifier/Model")
IOS_MODEL_NAME = "ImageClassifier"
ANDROID_MODEL = Path("android/app/src/main/assets/model.tflite")
#: What ``toolchain build`` option writes each app's format, for hints.
_BUILD_HINT = {"ios": "--target coreml", "android": "--target tflite"}


@dataclass(frozen=True)
class Installed:
    """What was installed where, and what the app will show."""

    source: Path
    destination: Path
    labels: tuple[str, ...]
    input_size: int
    project: Path


def default_apps_dir() -> Path:
    """The ``sample_apps`` folder of this checkout (the toolchain is installed editable)."""
    return Path(__file__).resolve().parents[1] / "sample_apps"


def _target(app: str):
    """The export target whose artifacts ``app`` runs."""
    import targets

    return targets.get("coreml" if app == "ios" else "tflite")


def _candidates(app: str, folder: Path) -> list[Path]:
    try:
        children = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as error:
        raise UsageError(f"cannot read build output folder {folder}: "
                         f"{error.strerror or error}") from None
    target = _target(app)
    return [p for p in children if not p.name.startswith(".") and target.opens(p)]


def choose(app: str, source: Path) -> Path:
    """The one model of ``app``'s format at ``source`` (a file, or a build output folder)."""
    if app not in APPS:
        raise UsageError(f"unknown app {app!r}", hint="--app takes ios or android")
    source = Path(source)
    kind = "Core ML model (.mlmodel or .mlpackage)" if app == "ios" else "TFLite model (.tflite)"
    if not source.exists():
        raise UsageError(f"{source} does not exist",
                         hint="pass the --output-dir of `toolchain build`")
    if source.is_dir() and source.suffix.lower() != ".mlpackage":
        found = _candidates(app, source)
        if not found:
            raise ModelError(f"{source} holds no {kind}",
                             hint=f"build one with `toolchain build ... {_BUILD_HINT[app]}`")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise UsageError(f"{source} holds {len(found)} models for {app} ({names})",
                             hint=f"pass the one to install: --from {found[0]}")
        return found[0]
    if not _target(app).opens(source):
        raise ModelError(f"{source} is not a {kind}")
    return source


def _ios_checks(path: Path) -> tuple[tuple[str, ...], int]:
    """Labels and input size of a Core ML model the iOS app can run, else ModelError."""
    from toolchain.runtimes import load_spec

    spec = load_spec(path)
    labels = _coreml_labels(path)
    inputs = list(spec.description.input)
    if len(inputs) != 1 or inputs[0].type.WhichOneof("Type") != "imageType":
        raise ModelError(f"{path} does not take one image as input, so Vision cannot feed it")
    image = inputs[0].type.imageType
    if image.width != image.height:
        raise ModelError(f"{path} takes a {image.width}x{image.height} image; the app expects "
                         "a square input")
    return labels, int(image.width)


def _coreml_labels(path: Path) -> tuple[str, ...]:
    from targets.coreml import read_labels

    try:
        labels = read_labels(path)
    except ModelError:
        labels = ()
    if not labels:
        raise ModelError(f"{path} has no embedded class labels, so the app could not name "
                         "what it sees", hint="convert it with `toolchain convert`, which embeds "
                                              "them")
    return labels


def _android_checks(path: Path) -> tuple[tuple[str, ...], int]:
    """Labels and input size from the TFLite metadata the Task Library reads, else ModelError."""
    from targets.tflite import _Embedded

    try:
        embedded = _Embedded.read(path)
    except ModelError:
        raise ModelError(f"{path} has no embedded labels (no TFLite metadata with labels.txt), "
                         "so the Task Library cannot name what it sees",
                         hint="convert it with `toolchain convert`, which embeds them") from None
    if not embedded.labels:
        raise ModelError(f"{path} has an empty labels.txt in its metadata")
    return embedded.labels, embedded.input_size


def install(app: str, source: Path, apps_dir: Path | None = None) -> Installed:
    """Check the model and copy it, atomically, to where ``app`` reads it."""
    apps = Path(apps_dir) if apps_dir is not None else default_apps_dir()
    if not (apps / app).is_dir():
        raise UsageError(f"no {app} sample app in {apps}",
                         hint="pass --apps-dir with the sample_apps folder of the toolchain")
    path = choose(app, source)
    if app == "ios":
        labels, size = _ios_checks(path)
        suffix = path.suffix.lower()
        destination = apps / IOS_MODEL_DIR / f"{IOS_MODEL_NAME}{suffix}"
        directory = suffix == ".mlpackage"
        with atomic.replacing(destination, directory=directory, suffix=suffix) as tmp:
            if directory:
                shutil.copytree(path, tmp)
            else:
                shutil.copyfile(path, tmp)
        other = destination.with_suffix(".mlmodel" if directory else ".mlpackage")
        if other.is_dir():
            shutil.rmtree(other)
        elif other.exists():
            other.unlink()
        project = apps / "ios" / "ImageClassifier.xcodeproj"
    else:
        labels, size = _android_checks(path)
        destination = apps / ANDROID_MODEL
        with atomic.replacing(destination, suffix=".tflite") as tmp:
            shutil.copyfile(path, tmp)
        project = apps / "android"
    return Installed(path, destination, labels, size, project)
