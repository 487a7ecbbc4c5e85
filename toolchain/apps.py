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

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from toolchain import atomic
from toolchain.errors import ModelError, UnsafeModel, UsageError
from toolchain.untrusted import shown

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
    """``./sample_apps`` (a checkout of the toolchain, or a copy of its apps), else a one-line
    UsageError saying what to pass: after ``pip install`` the package has no apps of its own."""
    here = Path("sample_apps")
    if here.is_dir():
        return here
    raise UsageError("no sample_apps folder here",
                     hint="pass --apps-dir with the sample_apps folder of a toolchain checkout, "
                          "or run from the checkout's root")


def _target(app: str):
    """The export target whose artifacts ``app`` runs."""
    import targets

    return targets.get("coreml" if app == "ios" else "tflite")


def _candidates(app: str, folder: Path) -> list[Path]:
    try:
        children = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as error:
        raise UsageError(f"cannot read build output folder {folder}: "
                         f"{error.strerror or error}") from error
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


def _checked(app: str, path: Path) -> tuple[tuple[str, ...], int]:
    """Labels and input size of a model ``app`` can run, read by the target's inspector; a
    model the app could not use is a one-line ModelError."""
    found = _target(app).inspect(path)
    runtime = "Vision" if app == "ios" else "the Task Library"
    if not found.labels:
        where = "class labels" if app == "ios" else "labels (no TFLite metadata with labels.txt)"
        raise ModelError(f"{path} has no embedded {where}, so the app could not name what it "
                         "sees", hint="convert it with `toolchain convert`, which embeds them")
    image = found.input
    if image is None:
        raise ModelError(f"{path} does not take one image as input, so {runtime} cannot feed it")
    if image.width != image.height:
        raise ModelError(f"{path} takes a {image.width}x{image.height} image; the app expects "
                         "a square input")
    return found.labels, image.width


def _files_only(folder: str, names: list[str]) -> list[str]:
    """``copytree``'s ``ignore``, used to refuse rather than ignore: an ``.mlpackage`` holds
    regular files and folders only, so a link (whose target could be ``/etc/shadow`` or a folder
    outside, shipped inside the app) or a special file met while copying, even one that appeared
    after the package was checked, stops the install. Nothing is ignored."""
    for name in names:
        mode = os.lstat(os.path.join(folder, name)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeModel(f"{shown(os.path.join(folder, name))} is not a regular file; the "
                              "package is not installed")
    return []


def install(app: str, source: Path, apps_dir: Path | None = None) -> Installed:
    """Check the model and copy it, atomically, to where ``app`` reads it."""
    apps = Path(apps_dir) if apps_dir is not None else default_apps_dir()
    if not (apps / app).is_dir():
        raise UsageError(f"no {app} sample app in {apps}",
                         hint="pass --apps-dir with the sample_apps folder of the toolchain")
    path = choose(app, source)
    labels, size = _checked(app, path)
    if app == "ios":
        suffix = path.suffix.lower()
        destination = apps / IOS_MODEL_DIR / f"{IOS_MODEL_NAME}{suffix}"
        directory = suffix == ".mlpackage"
        with atomic.replacing(destination, directory=directory, suffix=suffix) as tmp:
            if directory:
                shutil.copytree(path, tmp, ignore=_files_only)
            else:
                shutil.copyfile(path, tmp)
        other = destination.with_suffix(".mlmodel" if directory else ".mlpackage")
        if other.is_dir():
            shutil.rmtree(other)
        elif other.exists():
            other.unlink()
        project = apps / "ios" / "ImageClassifier.xcodeproj"
    else:
        destination = apps / ANDROID_MODEL
        with atomic.replacing(destination, suffix=".tflite") as tmp:
            shutil.copyfile(path, tmp)
        project = apps / "android"
    return Installed(path, destination, labels, size, project)
