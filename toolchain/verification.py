"""The verifier: every converted model agrees with the original on the held-out set, or fails.

Steps: the held-out set (the split's ``testing`` images, which training and quantization
calibration never see) → decode and resize each image once with the one image loader → the
original retrained model's probabilities → for every artifact, every runtime that can run it
on this machine (TFLite interpreter and Task Library; Core ML, or the NumPy Core ML executor off
macOS), the same pixels → compare.

What a check compares: top-1 agreement with the original, both models' accuracy against the
true labels, the largest and mean absolute difference of probabilities, agreement per class, the
images where they disagree, and a confusion matrix. Columns are matched by label *name*, read
from the artifact itself, so an artifact with wrong embedded labels fails even when its numbers
are right. The threshold depends on how the artifact stores its numbers (read from the file).

It never weakens itself (docs/ARCHITECTURE.md): an artifact that crashes, that has no runtime
on this machine, or that returns something malformed is a failure; ``allow_skip`` turns only
"no runtime here" into a visible *skipped*, never into *passed*.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain import model as model_io
from toolchain.dataset import ImageEntry, SplitOptions, scan
from toolchain.errors import (
    EXIT_CHECK_FAILED,
    DatasetError,
    ModelError,
    UnreadableImage,
    UsageError,
    first_line,
)
from toolchain.images import load_rgb
from toolchain.measure import RuntimeResult, measure, measure_isolated
from toolchain.options import Options, group, option

log = logging.getLogger("toolchain")

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
#: The version of ``report.json``'s layout (``Report.record``); raised when a field changes
#: meaning or disappears, so tools reading old reports can tell.
REPORT_SCHEMA_VERSION = 1
#: Variants that store int8 weights are held to the int8 threshold.
_THRESHOLD_OF = {"float32": "float32", "float16": "float16", "int8": "int8", "dynamic": "int8"}


@dataclass(frozen=True, kw_only=True)
class Threshold(Options):
    """The least top-1 agreement, and (when set) the largest absolute probability difference."""

    top1_agreement: float = option(1.0, "least top-1 agreement with the original",
                                   name="agreement", metavar="FRACTION")
    max_abs_diff: float | None = option(None, "largest absolute probability difference",
                                        name="max_diff", metavar="PROBABILITY",
                                        shown_default="none")

    def validate(self) -> None:
        if not 0.0 <= self.top1_agreement <= 1.0:
            raise UsageError(f"agreement threshold {self.top1_agreement} is not between 0 and 1")
        if self.max_abs_diff is not None and not 0.0 <= self.max_abs_diff <= 1.0:
            raise UsageError(f"max-diff threshold {self.max_abs_diff} is not between 0 and 1")

    def record(self) -> dict:
        return {"top1_agreement": self.top1_agreement, "max_abs_diff": self.max_abs_diff}


@dataclass(frozen=True, kw_only=True)
class Thresholds(Options):
    """One threshold per precision, read from each artifact; ``dynamic`` (int8 weights) uses
    ``int8``'s."""

    float32: Threshold = group(Threshold(top1_agreement=0.999, max_abs_diff=1e-3),
                               prefix="float32_")
    float16: Threshold = group(Threshold(top1_agreement=0.995), prefix="float16_")
    int8: Threshold = group(Threshold(top1_agreement=0.98), prefix="int8_")

    def of(self, precision: str) -> Threshold:
        if precision not in _THRESHOLD_OF:
            raise UsageError(f"no threshold for precision {precision!r}")
        return getattr(self, _THRESHOLD_OF[precision])


@dataclass(frozen=True, kw_only=True)
class VerifyOptions(Options):
    """How the verifier judges: thresholds per precision, skips, batches, child processes."""

    thresholds: Thresholds = group(Thresholds())
    allow_skip: bool = option(False, "show an artifact no runtime on this machine can run as "
                                     "skipped instead of failing (a skip is never a pass)")
    batch_size: int = option(32, "images per runtime call", cli=False)
    #: Run each artifact in a child process, so a runtime that crashes the process (TFLite
    #: segfaults on a truncated file) fails its check instead of the whole run. False runs
    #: in-process: faster, and what tests with stand-in runtimes need.
    isolate: bool = option(True, "run each artifact in a child process", cli=False)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError("the verifier's batch size must be at least 1")


@dataclass(frozen=True)
class HeldOut:
    """The held-out images, their true labels, and what was left out (with reasons)."""

    entries: tuple[ImageEntry, ...]
    image_dir: Path
    unreadable: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.entries)


def held_out(image_dir: Path, model_dir: Path) -> HeldOut:
    """The ``testing`` split of ``image_dir``, split as the model's training split it."""
    folder = model_io.find_dir(model_dir)
    info = model_io.load_info(folder)
    try:
        record = json.loads((folder / model_io.SPLIT_FILE).read_text(encoding="utf-8"))
        split = SplitOptions(validation_percentage=float(record["validation_percentage"]),
                             testing_percentage=float(record["testing_percentage"]))
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ModelError(f"cannot read the split of {folder / model_io.SPLIT_FILE}: "
                                  f"{first_line(error)}",
                                  hint="the held-out set is the split the model was trained "
                                       "with; retrain to write it") from error
    dataset = scan(image_dir, split)
    unknown = sorted(set(dataset.labels) - set(info.labels))
    if unknown:
        raise DatasetError(f"{image_dir} has classes the model does not know: {unknown}",
                           hint=f"the model knows {list(info.labels)}")
    entries = tuple(dataset.subset("testing"))
    if not entries:
        raise DatasetError(f"{image_dir} has no held-out (testing) images",
                           hint=f"{split.testing_percentage:g}% of each class is held out; "
                                f"add images or retrain with a larger --testing-percentage")
    return HeldOut(entries, Path(image_dir))


@dataclass
class Check:
    """One artifact in one runtime, compared with the original model."""

    target: str
    path: Path
    runtime: str
    precision: str
    threshold: Threshold
    status: str = FAILED
    reason: str = ""
    top1_agreement: float | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    accuracy: float | None = None
    per_class_agreement: dict[str, float] = field(default_factory=dict)
    disagreements: list[dict] = field(default_factory=list)
    confusion: np.ndarray | None = None
    seconds: float = 0.0
    #: How reports name the artifact: its file name, or its path when two share a name.
    shown: str = ""

    @property
    def name(self) -> str:
        return f"{self.shown or self.path.name} [{self.runtime}]"

    def record(self) -> dict:
        return {"target": self.target, "path": str(self.path), "runtime": self.runtime,
                "precision": self.precision, "status": self.status,
                "passed": self.status == PASSED, "reason": self.reason,
                "top1_agreement": self.top1_agreement, "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.mean_abs_diff, "accuracy": self.accuracy,
                "threshold": self.threshold.record(),
                "per_class_agreement": self.per_class_agreement,
                "disagreements": self.disagreements,
                "confusion_matrix": None if self.confusion is None else self.confusion.tolist(),
                "seconds": round(self.seconds, 3)}


@dataclass
class Report:
    """Everything the verifier found, for the report writers."""

    model: Path
    architecture: str
    labels: tuple[str, ...]
    image_dir: Path
    images: tuple[str, ...]
    truth: np.ndarray
    original: np.ndarray
    checks: list[Check]
    options: VerifyOptions
    unreadable: tuple[tuple[str, str], ...] = ()

    @property
    def passed(self) -> bool:
        """Every check passed (skips allowed only with ``allow_skip``), and at least one ran:
        a run where everything was skipped verified nothing."""
        allowed = {PASSED, SKIPPED} if self.options.allow_skip else {PASSED}
        statuses = [check.status for check in self.checks]
        return PASSED in statuses and all(status in allowed for status in statuses)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else EXIT_CHECK_FAILED

    @property
    def original_accuracy(self) -> float:
        return float(np.mean(self.original.argmax(1) == self.truth))

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.truth, self.original.argmax(1), len(self.labels))

    def record(self) -> dict:
        return {"schema_version": REPORT_SCHEMA_VERSION,
                "passed": self.passed, "held_out_images": len(self.images),
                "model": str(self.model), "architecture": self.architecture,
                "labels": list(self.labels), "image_dir": str(self.image_dir),
                "allow_skip": self.options.allow_skip,
                "original": {"accuracy": self.original_accuracy,
                             "confusion_matrix": self.confusion().tolist()},
                "unreadable_images": [{"path": p, "reason": r} for p, r in self.unreadable],
                "artifacts": [check.record() for check in self.checks]}


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Counts: row = true label, column = predicted label."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def verify(model_dir: Path, artifacts: list[Path], held: HeldOut,
           options: VerifyOptions = VerifyOptions()) -> Report:
    """Check every artifact in every runtime against the retrained model at ``model_dir``."""
    import targets

    if not artifacts:
        raise UsageError("nothing to verify", hint="pass --artifact PATH (repeatable)")
    chosen = []
    for path in map(Path, artifacts):
        if not path.exists():
            raise UsageError(f"artifact {path} does not exist")
        chosen.append((targets.for_artifact(path), path))
    folder = model_io.find_dir(model_dir)
    info, predict = model_io.predictor(folder)  # a Keras model or a retrained frozen graph
    spec = info.spec
    pixels, entries, unreadable = _decode(held, spec.input_size)
    truth = np.array([info.labels.index(entry.label) for entry in entries], np.int64)
    original = np.concatenate([
        predict(spec.preprocessing.apply(pixels[i:i + options.batch_size]))
        for i in range(0, len(pixels), options.batch_size)]).astype(np.float32)
    report = Report(folder, info.architecture, info.labels, held.image_dir,
                    tuple(entry.relpath for entry in entries), truth, original, [], options,
                    unreadable)
    names = [path.name for _, path in chosen]
    for target, path in chosen:
        checks = _check_artifact(target, path, report, pixels)
        for check in checks:
            check.shown = path.name if names.count(path.name) == 1 else str(path)
        report.checks.extend(checks)
    return report


def _decode(held: HeldOut, size: int):
    """Every held-out image decoded once; the same pixels go to every runtime."""
    rows, kept, unreadable = [], [], list(held.unreadable)
    for entry in held.entries:
        try:
            rows.append(load_rgb(entry.path, size))
        except UnreadableImage as error:
            log.warning("skipping held-out image %s: %s", entry.path, error.reason)
            unreadable.append((entry.relpath, error.reason))
            continue
        kept.append(entry)
    if not rows:
        raise DatasetError(f"none of the {len(held)} held-out images in {held.image_dir} "
                           f"could be read")
    return np.stack(rows), kept, tuple(unreadable)


def _check_artifact(target, path: Path, report: Report, pixels: np.ndarray) -> list[Check]:
    """One check per runtime; a file or runtime that cannot start is a failed check."""
    options = report.options
    run = measure_isolated if options.isolate else measure
    measured = run(target, path, pixels, options.batch_size)
    precision = measured.precision or "unknown"
    threshold = (options.thresholds.of(precision) if measured.precision
                 else Threshold(top1_agreement=1.0))
    if measured.error:
        return [Check(target.name, path, "none", precision, threshold, reason=measured.error)]
    if not measured.runtimes:
        return [Check(target.name, path, "none", precision, threshold,
                      status=SKIPPED if options.allow_skip else FAILED,
                      reason=f"no runtime on this machine can run {path.suffix} models")]
    return [_judge(Check(target.name, path, result.runtime, precision, threshold,
                         seconds=result.seconds), result, report)
            for result in measured.runtimes]


def _judge(check: Check, result: RuntimeResult, report: Report) -> Check:
    labels, count = tuple(report.labels), len(report.images)
    if sorted(result.labels) != sorted(labels):
        check.reason = (f"its embedded labels {list(result.labels)} are not the model's "
                        f"{list(labels)}")
    elif result.error or result.probabilities is None:
        check.reason = result.error or "returned nothing"
    elif result.probabilities.shape != (count, len(labels)):
        check.reason = f"returned shape {result.probabilities.shape}, not {(count, len(labels))}"
    elif not np.isfinite(result.probabilities).all():
        check.reason = "returned NaN or infinite probabilities"
    else:
        # Columns by label name: the artifact's own order, mapped onto the model's.
        order = [result.labels.index(label) for label in labels]
        _compare(check, result.probabilities[:, order], report)
    return check


def _compare(check: Check, probabilities: np.ndarray, report: Report) -> None:
    original, truth, labels = report.original, report.truth, report.labels
    ours, theirs = original.argmax(1), probabilities.argmax(1)
    agree = ours == theirs
    difference = np.abs(probabilities - original)
    check.top1_agreement = float(agree.mean())
    check.max_abs_diff = float(difference.max())
    check.mean_abs_diff = float(difference.mean())
    check.accuracy = float(np.mean(theirs == truth))
    check.per_class_agreement = {label: float(agree[truth == index].mean())
                                 for index, label in enumerate(labels) if (truth == index).any()}
    check.disagreements = [
        {"image": report.images[i], "label": labels[truth[i]],
         "original": labels[ours[i]], "original_score": float(original[i, ours[i]]),
         "artifact": labels[theirs[i]], "artifact_score": float(probabilities[i, theirs[i]])}
        for i in np.flatnonzero(~agree)]
    check.confusion = confusion_matrix(truth, theirs, len(labels))
    limit = check.threshold
    problems = []
    if check.top1_agreement < limit.top1_agreement:
        problems.append(f"top-1 agreement {check.top1_agreement:.4f} < {limit.top1_agreement}")
    if limit.max_abs_diff is not None and check.max_abs_diff > limit.max_abs_diff:
        problems.append(f"max abs diff {check.max_abs_diff:.2e} > {limit.max_abs_diff:g}")
    check.status = FAILED if problems else PASSED
    check.reason = "; ".join(problems)

