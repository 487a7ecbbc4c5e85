"""``toolchain install``: drop a built model into a sample app, at the one place the app reads.

- iOS: ``sample_apps/ios/ImageClassifier/Model/ImageClassifier.mlmodel`` (or ``.mlpackage``);
  Xcode compiles either into ``ImageClassifier.mlmodelc``, which the app loads by name. Only one
  of the two may exist (both would compile to the same name), so the other is removed.
- Android: ``sample_apps/android/app/src/main/assets/model.tflite``, opened by MediaPipe
  Tasks' ``ImageClassifier`` (``com.google.mediapipe:tasks-vision``).

The apps read the labels (and, on Android, the normalisation) from the model itself, so a model
without them is refused here, in one line, rather than failing on a phone. The copy is atomic:
an interrupted install leaves the previous model in place.

Only a verified model is installed (``toolchain.gate``): the ``report.json`` beside it must
record a passing verdict for exactly its bytes. A failed, inconclusive, skipped, stale or
never-verified model is refused in one line saying which and what to run; from a build folder
holding several models for the app, the one that passed is picked and the others named.
``allow_unverified`` installs anyway, with a warning. Beside the model, in the app (so it ships
with it), a verification record says what the verifier said of those bytes
(``model.verification.json`` on Android, ``ImageClassifier.verification.json`` on iOS),
``installed_unverified`` included.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from toolchain import __version__, atomic, gate
from toolchain.errors import ModelError, UnsafeModel, UnverifiedModel, UsageError
from toolchain.untrusted import shown

APPS = ("ios", "android")
#: Where each app reads its model, relative to the sample apps folder.
IOS_MODEL_DIR = Path("ios/ImageClassifier/Model")
IOS_MODEL_NAME = "ImageClassifier"
ANDROID_MODEL = Path("android/app/src/main/assets/model.tflite")
#: The verification record beside each app's model (bundled with it).
IOS_RECORD = IOS_MODEL_DIR / f"{IOS_MODEL_NAME}.verification.json"
ANDROID_RECORD = ANDROID_MODEL.with_name("model.verification.json")
log = logging.getLogger("toolchain")
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
    #: What the verifier said of the installed bytes (``toolchain.gate``).
    verdict: gate.Verdict | None = None
    #: Why this model of a build folder's several (the one that passed), or "".
    picked: str = ""
    #: The app's verification record, beside the model.
    record: Path | None = None


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


def choose(app: str, source: Path) -> tuple[Path, str]:
    """The one model of ``app``'s format at ``source`` (a file, or a build output folder), and
    why it was picked when the folder holds several: the one the verifier passed."""
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
            verdicts = {path: gate.verdict(path) for path in found}
            passing = [path for path in found if verdicts[path].passed]
            if len(passing) == 1:
                others = "; ".join(f"{path.name} {verdicts[path].status}" for path in found
                                   if path != passing[0])
                return passing[0], (f"picked {passing[0].name}, the one that passed "
                                    f"verification ({others})")
            names = ", ".join(f"{path.name}: {verdicts[path].status}" for path in found)
            raise UsageError(f"{source} holds {len(found)} models for {app} ({names})",
                             hint=f"pass the one to install: --from {(passing or found)[0]}")
        return found[0], ""
    if not _target(app).opens(source):
        raise ModelError(f"{source} is not a {kind}")
    return source, ""


def _refusal(path: Path, verdict: gate.Verdict) -> UnverifiedModel:
    """Why ``path`` is not installed, in one line, and what to run."""
    name = shown(path.name)
    anyway = "or pass --allow-unverified to install it anyway"
    verify = (f"toolchain verify --model MODEL --artifact {shown(str(path))} --images PHOTOS "
              "(or toolchain build, which verifies what it builds)")
    if verdict.status == gate.FAILED:
        return UnverifiedModel(f"{name} failed verification ({verdict.reason}); it is not "
                               "installed", hint=f"see {shown(str(verdict.report))} and report.md "
                                                 f"beside it; rebuild it, {anyway}")
    if verdict.status == gate.SKIPPED:
        return UnverifiedModel(f"{name} was not run when it was verified ({verdict.reason}); "
                               "it is not installed", hint=f"verify it where its runtime runs: "
                                                           f"{verify}, {anyway}")
    if verdict.status == gate.INCONCLUSIVE:
        return UnverifiedModel(f"{name}'s verification was inconclusive ({verdict.reason}); "
                               "it is not installed", hint=f"verify it on more photos of the "
                                                           f"kind the app will see (no labels "
                                                           f"needed): {verify}, {anyway}")
    what = ("is not the model that was verified" if verdict.status == gate.STALE
            else "was never verified")
    return UnverifiedModel(f"{name} {what}: {verdict.reason}; it is not installed",
                           hint=f"verify it: {verify}, {anyway}")


def _checked(app: str, path: Path) -> tuple[tuple[str, ...], int]:
    """Labels and input size of a model ``app`` can run, read by the target's inspector; a
    model the app could not use is a one-line ModelError."""
    found = _target(app).inspect(path)
    runtime = "Vision" if app == "ios" else "MediaPipe Tasks"
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


def install(app: str, source: Path, apps_dir: Path | None = None,
            allow_unverified: bool = False) -> Installed:
    """Check the model (its labels and input, and that a passing verification covers its
    bytes) and copy it, atomically, to where ``app`` reads it, with its verification record."""
    apps = Path(apps_dir) if apps_dir is not None else default_apps_dir()
    if not (apps / app).is_dir():
        raise UsageError(f"no {app} sample app in {apps}",
                         hint="pass --apps-dir with the sample_apps folder of the toolchain")
    path, picked = choose(app, source)
    labels, size = _checked(app, path)
    verdict = gate.verdict(path)
    if not verdict.passed:
        refusal = _refusal(path, verdict)
        if not allow_unverified:
            raise refusal
        log.warning("installing it anyway (--allow-unverified): %s; the app's verification "
                    "record says so", refusal.message.removesuffix("; it is not installed"))
    record = apps / (IOS_RECORD if app == "ios" else ANDROID_RECORD)
    record.unlink(missing_ok=True)  # an interrupted install leaves no record of another model
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
    atomic.write_json(record, {"model": destination.name, "source": str(path),
                               **verdict.record(), "installed_unverified": not verdict.passed,
                               "toolchain_version": __version__})
    return Installed(path, destination, labels, size, project, verdict, picked, record)
