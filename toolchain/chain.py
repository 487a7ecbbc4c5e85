"""``toolchain build``: the whole chain, from an image folder to verified artifacts and reports.

Steps: bottlenecks (cached) → retrain into ``OUTPUT/model`` → export each requested target into
``OUTPUT`` → verify every artifact that was written against the retrained model on the held-out
split (or on every photo of ``verify_images``: the split of a small folder is too small to show
a float32 threshold) → write ``report.json``, ``report.md``, ``junit.xml`` and ``confusion/``
into ``OUTPUT``. A target that fails does not stop the others; the result records each failure
in one line. The exit code is 2 when a target failed, else the verifier's: 0 when every check
passed, 1 when any failed, 3 when the verdict is inconclusive.

A build folder is one consistent unit: the model, the artifacts and the reports in it always
come from one run. The build writes everything into a hidden sibling of ``OUTPUT`` and swaps it
in when done (``.OUTPUT.<host>-<pid>.<random>.tmp``, the names ``toolchain/atomic.py`` sweeps),
so an interrupted build leaves the previous build whole, and a finished one leaves only what it
made: a stale ``model_int8.tflite`` of an earlier build with another target does not survive
it. The folder holds only what builds make (:data:`PRODUCTS`); anything else in it is refused
before the work, and anything that appeared during the run is moved aside, never deleted. One
build at a time writes a folder (``atomic.exclusive``): a second one is refused in one line
naming the first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from targets import ArtifactMetadata, Target
from toolchain import atomic
from toolchain.backbones import Backbone
from toolchain.conversion import Conversion, convert, source_from_model
from toolchain.dataset import Dataset, labels_text
from toolchain.distortions import Distortions
from toolchain.errors import EXIT_ERROR, DatasetError, UsageError, WriteError
from toolchain.options import Options
from toolchain.training import OutputOptions, RetrainResult, TrainingOptions, retrain
from toolchain.verification import HeldOut, Report, VerifyOptions, images_in, verify

log = logging.getLogger("toolchain")

#: A ``convert`` or ``retrain`` into a folder inside the build folder locks it beside itself.
_LOCK = re.compile(r"^\..+\.lock$")
#: What builds write in their folder: the model folder, the artifacts (``model_<precision>``
#: files and ``.mlpackage`` folders), labels.txt and the reports (toolchain/report.py).
PRODUCTS = re.compile(r"^(model|model_[^/]+|labels\.txt|report\.(json|md)|junit\.xml|confusion)$")


@dataclass(frozen=True)
class BuildResult:
    """What a build produced: the retrained model, one conversion per target, the verifier's
    report (None when no artifact was written) and the report files."""

    output_dir: Path
    retrained: RetrainResult
    conversions: tuple[Conversion, ...]
    report: Report | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def artifacts(self) -> list[Path]:
        """Every artifact written, in target order."""
        return [item.path for item in self.conversions if item.ok]

    @property
    def passed(self) -> bool:
        """Every target converted and every artifact verified."""
        return (all(item.ok for item in self.conversions) and self.report is not None
                and self.report.passed)

    @property
    def verdict(self) -> str:
        """The verifier's ``passed``, ``failed`` or ``inconclusive``; ``failed`` when a target
        failed or nothing was verified."""
        if not all(item.ok for item in self.conversions) or self.report is None:
            return "failed"
        return self.report.verdict

    @property
    def exit_code(self) -> int:
        if not all(item.ok for item in self.conversions) or self.report is None:
            return EXIT_ERROR
        return self.report.exit_code


def build(dataset: Dataset, backbone: Backbone, *, cache_dir: Path, output_dir: Path,
          jobs: list[tuple[Target, Options]], metadata: ArtifactMetadata,
          training: TrainingOptions = TrainingOptions(),
          distortions: Distortions = Distortions(), outputs: OutputOptions = OutputOptions(),
          verification: VerifyOptions = VerifyOptions(), progress: bool = True,
          require_cached: bool = False, verify_images: Path | None = None) -> BuildResult:
    """Retrain into ``output_dir/model``, export every (target, options), verify, report; all
    in a hidden sibling swapped in at the end (see the module docstring)."""
    output_dir = Path(output_dir)
    # Read once, before the long work (a build that cannot verify must not train for an hour);
    # the model's labels will be the dataset's (training.retrain).
    held = (images_in(verify_images, dataset.labels) if verify_images is not None
            else HeldOut(tuple(dataset.subset("testing")), dataset.root))
    if not len(held):
        raise DatasetError(f"{dataset.root} has no held-out (testing) images, so the artifacts "
                           "could not be verified",
                           hint="add images or raise --testing-percentage")
    with atomic.exclusive(output_dir, "build"):
        final = output_dir.absolute()
        atomic.sweep(final.parent)  # what a killed build left: its staging or previous folder
        _check_folder(final, Path(cache_dir))
        # The folder the user named must be writable, not only its parent (the stage's): a
        # read-only folder is refused, not swapped away. A new one is not made before the swap.
        if final.is_dir():
            atomic.check_writable(final)
        stage = _stage(final)
        try:
            result = _build_in(stage, dataset, backbone, held, cache_dir=cache_dir, jobs=jobs,
                               metadata=metadata, training=training, distortions=distortions,
                               outputs=_staged(outputs, final, stage),
                               verification=verification, progress=progress,
                               require_cached=require_cached, final=final)
            _swap(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return _moved(result, stage, output_dir)


def _build_in(stage: Path, dataset: Dataset, backbone: Backbone, held: HeldOut, *,
              cache_dir: Path, jobs, metadata, training, distortions, outputs, verification,
              progress, require_cached, final: Path) -> BuildResult:
    """The chain, written into ``stage``; the reports name the files where they will be after
    the swap (``final``)."""
    from toolchain import report as report_io

    model_dir = stage / "model"
    retrained = retrain(dataset, backbone, cache_dir=cache_dir, output_dir=model_dir,
                        training=training, distortions=distortions, outputs=outputs,
                        progress=progress, require_cached=require_cached)
    # Converted from what was written, not from the in-memory model: the artifacts then come
    # from exactly the files a later `toolchain convert --model` would read.
    conversions = tuple(convert(source_from_model(model_dir), jobs, metadata, stage))
    atomic.write_text(stage / "labels.txt", labels_text(retrained.info.labels))
    written = [item.path for item in conversions if item.ok]
    if not written:
        return BuildResult(stage, retrained, conversions)
    report = verify(model_dir, written, held, verification)
    _relocate(report, stage, final)
    files = report_io.write(report, stage)
    return BuildResult(stage, retrained, conversions, report, files)


def _check_folder(folder: Path, cache_dir: Path) -> None:
    """Refuse, before the work, a folder the swap would take something of the user's from."""
    def inside(path: Path) -> bool:
        return path.absolute() == folder or folder in path.absolute().parents

    if inside(cache_dir):
        raise UsageError(f"the bottleneck cache {cache_dir} is inside the build folder "
                         f"{folder}, which each build replaces whole",
                         hint="pass a --bottleneck-dir outside --output-dir")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UsageError(f"--output-dir {folder} is not a folder",
                         hint="pass a new or empty folder, or one an earlier build wrote")
    foreign = sorted(_foreign(folder)) if folder.is_dir() else []
    if foreign:
        raise UsageError(f"{folder} holds {len(foreign)} file(s) a build did not make (first: "
                         f"{foreign[0]}); a build replaces its folder whole",
                         hint="pass a new or empty --output-dir, or move those files out")


def _foreign(folder: Path) -> list[str]:
    """Names in ``folder`` that no build makes (a dead writer's temporary name is a build's)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [name for name in names if not PRODUCTS.match(name)
            and not atomic._TEMP_NAME.match(name) and not _LOCK.match(name)]


def _stage(final: Path) -> Path:
    """The hidden, empty sibling the build writes into; a name ``atomic.sweep`` knows."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{atomic._owner()}.", suffix=".tmp",
                                      dir=final.parent))
        probe = stage / ".mode"  # mkdtemp's 0700 -> what the umask gives a new folder
        probe.mkdir()
        os.chmod(stage, probe.stat().st_mode & 0o777)
        probe.rmdir()
    except OSError as error:
        raise WriteError(f"cannot write beside {final}: {error.strerror or error}",
                         hint="check that the folder is writable and has free space") from error
    return stage


def _staged(outputs: OutputOptions, final: Path, stage: Path) -> OutputOptions:
    """retrain.py's extra outputs that were asked for inside the build folder go into the stage,
    so the swap keeps them."""
    def moved(path: Path | None) -> Path | None:
        return None if path is None else _inside(Path(path).absolute(), final, stage, path)

    return dataclasses.replace(outputs, summaries_dir=moved(outputs.summaries_dir),
                               output_graph=moved(outputs.output_graph),
                               output_labels=moved(outputs.output_labels))


def _inside(path: Path, old: Path, new: Path, otherwise=None):
    try:
        return new / path.relative_to(old)
    except ValueError:
        return path if otherwise is None else otherwise


def _swap(stage: Path, final: Path) -> None:
    """``stage`` becomes ``final``. The previous build goes to a ``.old`` sibling first: were
    this process killed between the two renames, the next build's sweep puts it back. Anything
    in it that no build made (it appeared during this run) is moved aside, never deleted."""
    old = None
    try:
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.{atomic._owner()}.",
                                        suffix=".old", dir=final.parent))
            old.rmdir()
            os.replace(final, old)
        try:
            os.replace(stage, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)  # the previous build stays whole
            raise
    except OSError as error:
        raise WriteError(f"cannot replace {final}: {error.strerror or error}",
                         hint="check that the folder is writable") from error
    if old is None:
        return
    foreign = _foreign(old)
    if foreign:
        aside = final.parent / f"{final.name}.moved-aside-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(old, aside)
        log.warning("%d file(s) that no build made appeared in %s during the build (first: %s); "
                    "moved with the previous build to %s", len(foreign), final,
                    sorted(foreign)[0], aside)
    else:
        shutil.rmtree(old, ignore_errors=True)


def _relocate(report: Report, stage: Path, final: Path) -> None:
    """The report names every file where it will be after the swap."""
    report.model = _inside(Path(report.model), stage, final)
    for check in report.checks:
        check.path = _inside(check.path, stage, final)
    report.files = {str(_inside(Path(path), stage, final)): value
                    for path, value in report.files.items()}
    if "path" in report.original_model:
        report.original_model = {**report.original_model,
                                 "path": str(_inside(Path(report.original_model["path"]),
                                                     stage, final))}


def _moved(result: BuildResult, stage: Path, output_dir: Path) -> BuildResult:
    """``result`` with every path in the swapped-in folder, as the caller named it."""
    def at(path: Path | None) -> Path | None:
        return None if path is None else _inside(Path(path), stage, output_dir)

    retrained = dataclasses.replace(result.retrained, output_dir=at(result.retrained.output_dir))
    conversions = tuple(dataclasses.replace(item, path=at(item.path))
                        for item in result.conversions)
    files = {name: at(path) for name, path in result.files.items()}
    return BuildResult(output_dir, retrained, conversions, result.report, files)
