"""The verifier: every converted model agrees with the original on the held-out set, or fails.

Steps: the held-out images (the recorded split's ``testing`` images, which training and
quantization calibration never see, or every photo of any folder: :mod:`toolchain.heldout`) →
decode and resize each image once with the one image loader → the original's probabilities (a
retrain folder, a frozen graph or a ``.keras`` file: :mod:`toolchain.originals`) → for every
artifact, every runtime that can run it on this machine (TFLite interpreter, MediaPipe Tasks
and the Task Library; Core ML's CPU, or the NumPy Core ML executor off macOS, and the executor
in float16 as a GPU or Neural Engine computes: a *device row*, judged by
``Thresholds.of(precision, compute)``), the same pixels → compare. Each TFLite artifact also
gets *full-size* rows: each app runtime fed every photo at its own size, resizing
it itself as the Android app does, compared with the original on our resized pixels.

What a check compares: top-1 agreement with the original, with its 95% Wilson interval and the
number of images; both models' accuracy against the true labels (when the images have labels);
the largest and mean absolute difference of probabilities, agreement per class, the images where
they disagree, and a confusion matrix. Columns are matched by label *name*, read from the
artifact itself, so an artifact with wrong embedded labels fails even when its numbers are
right. The threshold depends on how the artifact stores its numbers (read from the file).

Three verdicts: *passed*, *failed*, and *inconclusive*. A check that meets its threshold on a
set too small for that threshold to mean anything (:func:`statistics.images_needed`: 0.999
needs 2000 images, 0.995 400, 0.98 100) is ``inconclusive``, not passed, unless the user
accepted the set: ``accept_small_set``, or ``min_images`` N with at least N images (fewer fails
the run). A failure on a small set stays a failure. Parity needs no labels, so the way out is
more photos of the kind the app will see (``verify --images DIR``).

It never weakens itself (docs/ARCHITECTURE.md): an artifact that crashes, that has no runtime
on this machine, or that returns something malformed is a failure; ``allow_skip`` turns only
"no runtime here" into a visible *skipped*, never into *passed*.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain import gate
from toolchain.checks import (
    FAILED,
    FULL_SIZE,
    INCONCLUSIVE,
    MEASURED,
    PASSED,
    RESIZED,
    SKIPPED,
    Check,
    interval_pair,
)
from toolchain.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INCONCLUSIVE,
    DatasetError,
    UnreadableImage,
    UsageError,
)
from toolchain.heldout import HeldOut, held_out, images_in
from toolchain.images import load_rgb
from toolchain.measure import RuntimeResult, measure, measure_isolated
from toolchain.options import Options, group, option
from toolchain.originals import Original, open_original
from toolchain.statistics import Threshold, Thresholds, images_needed, wilson

log = logging.getLogger("toolchain")

#: The version of ``report.json``'s layout (``Report.record``); raised when a field changes
#: meaning or disappears, so tools reading old reports can tell. 2: the original may be any
#: model, accuracy may be null (unlabelled images), a confusion matrix's rows may be the
#: original's predictions, and the full-size rows. 3: a check's status and the run's
#: ``verdict`` may be ``inconclusive`` (``passed`` is then false).
REPORT_SCHEMA_VERSION = 3

__all__ = ["FAILED", "FULL_SIZE", "INCONCLUSIVE", "MEASURED", "PASSED", "REPORT_SCHEMA_VERSION",
           "RESIZED", "SKIPPED", "Check", "HeldOut", "Report", "Threshold", "Thresholds",
           "VerifyOptions", "confusion_matrix", "held_out", "images_in", "verify"]


@dataclass(frozen=True, kw_only=True)
class VerifyOptions(Options):
    """How the verifier judges: thresholds per precision, the least set size, skips, batches,
    child processes."""

    thresholds: Thresholds = group(Thresholds())
    full_size_agreement: float | None = option(
        None, "judge each TFLite artifact's app-runtime runs on the full-size photos (they "
              "resize them themselves, as the app does): the least top-1 agreement",
        metavar="FRACTION", shown_default="measured and shown, not judged")
    min_images: int = option(0, "the least held-out set you accept: fewer fails the run, at "
                                "least this many is judged even where a threshold needs more "
                                "(0: off)", metavar="N")
    accept_small_set: bool = option(
        False, "judge a set too small for a threshold as if it were large enough (passed or "
               "failed), instead of calling it inconclusive")
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
        if self.min_images < 0:
            raise UsageError("--min-images must be 0 (off) or more")
        agreement = self.full_size_agreement
        if agreement is not None and not 0.0 <= agreement <= 1.0:
            raise UsageError(f"--full-size-agreement {agreement} is not between 0 and 1")


def _interval(hits: np.ndarray) -> tuple[float, float]:
    return wilson(int(np.count_nonzero(hits)), len(hits))


@dataclass
class Report:
    """Everything the verifier found, for the report writers.

    ``truth`` is None when the images have no labels: accuracy is then None, and confusion
    matrices and per-class agreement are per *original's prediction* (``rows``)."""

    model: Path
    architecture: str
    labels: tuple[str, ...]
    image_dir: Path
    images: tuple[str, ...]
    truth: np.ndarray | None
    original: np.ndarray
    checks: list[Check]
    options: VerifyOptions
    unreadable: tuple[tuple[str, str], ...] = ()
    #: ``Original.record()``: kind, path, architecture, input size, preprocessing and its source.
    original_model: dict = field(default_factory=dict)
    #: ``split`` (the recorded testing split) or ``folder`` (every image of ``--images``).
    held_out_from: str = "split"
    unlabelled_because: str = ""
    #: What each quantized artifact's export measured (``Target.diagnosis``), by the name of
    #: the artifact it describes: a TFLite or Core ML repair record.
    quantization: dict = field(default_factory=dict)
    #: Runtimes a target has elsewhere that this machine lacks, with the reason
    #: (``Target.runtimes_not_here``): shown as warnings, never as checks that passed.
    runtimes_not_here: dict = field(default_factory=dict)
    #: Each artifact's (SHA-256, bytes) as measured, by path: what ``install`` matches.
    files: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.truth is not None

    @property
    def rows(self) -> str:
        """What the rows of the confusion matrices and the per-class keys are."""
        return "true label" if self.labelled else "original's prediction"

    @property
    def failures(self) -> list[str]:
        """Why the run fails besides its checks: a set smaller than ``min_images``."""
        least = self.options.min_images
        if least and len(self.images) < least:
            return [f"{len(self.images)} held-out images, fewer than --min-images {least}"]
        return []

    @property
    def warnings(self) -> list[str]:
        """One line per threshold the set is too small for (statistics.images_needed), one per
        reason a runtime did not run on this machine, one per artifact only a device row failed
        (:meth:`_device_notes`), and one per repair record whose artifact failed here
        (:meth:`_quantization_notes`)."""
        found: dict[float, list[str]] = {}
        for check in self.checks:
            if check.too_few_images:
                kinds = found.setdefault(check.threshold.top1_agreement, [])
                kind = ("full-size" if check.input == FULL_SIZE else
                        f"{check.compute} compute" if check.compute else check.precision)
                if kind not in kinds:
                    kinds.append(kind)
        n, lines = len(self.images), []
        for threshold, kinds in found.items():
            allowed = int(n * (1 - threshold) + 1e-9)
            lines.append(f"{n} images are too few for the agreement threshold {threshold:g} "
                         f"({', '.join(kinds)}): it allows {allowed} disagreement(s) (one in "
                         f"{n} is {1 - 1 / n:.4f}); {images_needed(threshold)} images would "
                         f"allow two")
        reasons: dict[str, list[str]] = {}
        for runtime, why in self.runtimes_not_here.items():
            reasons.setdefault(why, []).append(runtime)
        lines += [f"not run on this machine: {', '.join(runtimes)}: {why}"
                  for why, runtimes in reasons.items()]
        return lines + self._device_notes() + self._quantization_notes()

    def _device_notes(self) -> list[str]:
        """One line per artifact that passes as stored but fails a device row: what to do."""
        stored = {check.path for check in self.checks
                  if check.compute is None and check.status == FAILED}
        return [f"{check.shown or check.path.name}: passes as the CPU computes it but not in "
                f"{check.compute} (a GPU or the Neural Engine): run it with computeUnits = "
                f".cpuOnly, or ship a model that {check.compute} does not break"
                for check in self.checks
                if check.compute and check.status == FAILED and check.path not in stored]

    def _quantization_notes(self) -> list[str]:
        """Why a quantized artifact that its export measured still failed here: one line per
        repair record whose plain or repaired artifact failed a judged check (the rows as
        stored: the repair measures those, not a device row)."""
        from targets._repair import failure_note

        failed = {check.path.name for check in self.checks
                  if check.status == FAILED and check.compute is None}
        notes = (failure_note(artifact, record, failed)
                 for artifact, record in self.quantization.items())
        return [note for note in notes if note]

    @property
    def verdict(self) -> str:
        """``failed`` when a check failed (or was skipped without ``allow_skip``), the set is
        below ``min_images``, or no check was judged (a run where everything was skipped
        verified nothing); else ``inconclusive`` when a check met its threshold on too few
        images to show it; else ``passed``. A measured row is no verdict."""
        allowed = {PASSED, INCONCLUSIVE, MEASURED}
        if self.options.allow_skip:
            allowed.add(SKIPPED)
        statuses = {check.status for check in self.checks}
        if (self.failures or not statuses <= allowed
                or not statuses & {PASSED, INCONCLUSIVE}):
            return FAILED
        return INCONCLUSIVE if INCONCLUSIVE in statuses else PASSED

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    @property
    def hint(self) -> str:
        """What settles an inconclusive verdict ("" otherwise): more photos, no labels needed."""
        needed = [check.images_needed or 0 for check in self.checks
                  if check.status == INCONCLUSIVE]
        if self.verdict != INCONCLUSIVE or not needed:
            return ""
        return (f"{len(self.images)} images cannot show the thresholds; {max(needed)} photos of "
                f"the kind the app will see can, and parity needs no labels: `toolchain verify "
                f"--images DIR`; or accept this set with --accept-small-set or --min-images N")

    @property
    def small_set_accepted(self) -> bool:
        """The user said this set is enough (``accept_small_set``, or ``min_images`` N with
        at least N images): a check on it is judged, never inconclusive."""
        least = self.options.min_images
        return self.options.accept_small_set or bool(least and len(self.images) >= least)

    @property
    def exit_code(self) -> int:
        return {PASSED: 0, INCONCLUSIVE: EXIT_INCONCLUSIVE}.get(self.verdict, EXIT_CHECK_FAILED)

    @property
    def original_accuracy(self) -> float | None:
        if self.truth is None:
            return None
        return float(np.mean(self.original.argmax(1) == self.truth))

    @property
    def original_accuracy_interval(self) -> tuple[float, float] | None:
        if self.truth is None or not len(self.images):
            return None
        return _interval(self.original.argmax(1) == self.truth)

    def confusion(self) -> np.ndarray | None:
        """The original's confusion matrix; None without labels (it would be diagonal)."""
        if self.truth is None:
            return None
        return confusion_matrix(self.truth, self.original.argmax(1), len(self.labels))

    def record(self) -> dict:
        confusion = self.confusion()
        return {"schema_version": REPORT_SCHEMA_VERSION, "verdict": self.verdict,
                "passed": self.passed, "held_out_images": len(self.images),
                "held_out_from": self.held_out_from, "labelled": self.labelled,
                "unlabelled_because": self.unlabelled_because,
                "confusion_rows": self.rows,
                "model": str(self.model), "architecture": self.architecture,
                "labels": list(self.labels), "image_dir": str(self.image_dir),
                "allow_skip": self.options.allow_skip, "min_images": self.options.min_images,
                "accept_small_set": self.options.accept_small_set,
                "failures": self.failures, "warnings": self.warnings,
                "original": {**self.original_model, "accuracy": self.original_accuracy,
                             "accuracy_interval": interval_pair(self.original_accuracy_interval),
                             "confusion_matrix": None if confusion is None
                             else confusion.tolist()},
                "unreadable_images": [{"path": p, "reason": r} for p, r in self.unreadable],
                "artifacts": [check.record() for check in self.checks],
                "files": gate.files(self), "quantization": self.quantization}


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Counts: row = true label (or the original's prediction), column = predicted label."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def verify(original: Path | Original, artifacts: list[Path], held: HeldOut,
           options: VerifyOptions = VerifyOptions()) -> Report:
    """Check every artifact in every runtime against ``original`` (an :class:`Original`, or
    the path of a retrain folder, a frozen graph or a ``.keras`` file with default graph
    options) on the images of ``held``."""
    import targets

    if not artifacts:
        raise UsageError("nothing to verify", hint="pass --artifact PATH (repeatable)")
    chosen = []
    for path in map(Path, artifacts):
        if not path.exists():
            raise UsageError(f"artifact {path} does not exist")
        chosen.append((targets.for_artifact(path), path))
    if not isinstance(original, Original):
        original = open_original(Path(original))
    pixels, entries, unreadable = _decode(held, original.input_size)
    truth = None
    if held.labelled:
        truth = np.array([original.labels.index(entry.label) for entry in entries], np.int64)
    log.info("verifying %d artifact(s) on %d held-out images", len(chosen), len(pixels))
    probabilities = original.probabilities(pixels, options.batch_size)
    report = Report(original.path, original.architecture, original.labels, held.image_dir,
                    tuple(entry.relpath for entry in entries), truth, probabilities, [],
                    options, unreadable, original.record(), held.source,
                    held.unlabelled_because)
    names = [path.name for _, path in chosen]
    photos = [entry.path for entry in entries]
    for target, path in chosen:
        report.files[str(path)] = (targets.artifact_digest(path), targets.artifact_bytes(path))
        checks = _check_artifact(target, path, report, pixels, photos)
        for check in checks:
            check.shown = path.name if names.count(path.name) == 1 else str(path)
        report.checks.extend(checks)
        report.runtimes_not_here.update(target.runtimes_not_here())
        found = target.diagnosis(path)
        if found:
            report.quantization[found.get("artifact", path.name)] = found
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


def _check_artifact(target, path: Path, report: Report, pixels: np.ndarray,
                    photos: list[Path]) -> list[Check]:
    """One check per runtime; a file or runtime that cannot start is a failed check."""
    options = report.options
    if options.isolate:
        measured = measure_isolated(target, path, pixels, options.batch_size, photos=photos)
    else:
        measured = measure(target, path, pixels, options.batch_size, photos=photos)
    precision = measured.precision or "unknown"
    threshold = (options.thresholds.of(precision) if measured.precision
                 else Threshold(top1_agreement=1.0))
    if measured.error:
        return [Check(target.name, path, "none", precision, threshold, reason=measured.error)]
    if not measured.runtimes:
        return [Check(target.name, path, "none", precision, threshold,
                      status=SKIPPED if options.allow_skip else FAILED,
                      reason=f"no runtime on this machine can run {path.suffix} models")]
    checks = []
    for result in measured.runtimes:
        judged = (options.thresholds.of(precision, result.compute)
                  if result.compute and measured.precision else threshold)
        check = Check(target.name, path, result.runtime, precision,
                      _full_size(judged, options) if result.full_size else judged,
                      seconds=result.seconds, input=FULL_SIZE if result.full_size else RESIZED,
                      compute=result.compute)
        checks.append(_judge(check, result, report))
        if result.full_size and options.full_size_agreement is None:
            _measured_only(check)
    return checks


def _full_size(threshold: Threshold, options: VerifyOptions) -> Threshold:
    """A full-size row's threshold: ``full_size_agreement``, else (for reference) the
    precision's agreement; never a probability bound: its pixels differ from the original's by
    design (another resize), so a probability difference measures the resize, not the
    conversion."""
    agreement = options.full_size_agreement
    return Threshold(top1_agreement=threshold.top1_agreement if agreement is None
                     else agreement)


def _measured_only(check: Check) -> None:
    """No ``full_size_agreement``: a full-size row with figures is shown, not judged (a row
    that crashed or returned something malformed still fails)."""
    if check.top1_agreement is None:
        return
    check.status = MEASURED
    check.reason = ("not judged (--full-size-agreement judges it)"
                    if check.top1_agreement >= check.threshold.top1_agreement else
                    f"below the {check.precision} agreement threshold "
                    f"{check.threshold.top1_agreement:g}: the app's resize changes predictions "
                    f"our resize does not; not judged (--full-size-agreement judges it)")


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
    # Without labels, rows (and per-class keys) are the original's predictions.
    rows = ours if truth is None else truth
    agree = ours == theirs
    difference = np.abs(probabilities - original)
    check.images = len(agree)
    check.top1_agreement = float(agree.mean())
    check.top1_agreement_interval = _interval(agree)
    check.max_abs_diff = float(difference.max())
    check.mean_abs_diff = float(difference.mean())
    if truth is not None:
        check.accuracy = float(np.mean(theirs == truth))
        check.accuracy_interval = _interval(theirs == truth)
    check.per_class_agreement = {label: float(agree[rows == index].mean())
                                 for index, label in enumerate(labels) if (rows == index).any()}
    check.disagreements = [
        {"image": report.images[i], "label": None if truth is None else labels[truth[i]],
         "original": labels[ours[i]], "original_score": float(original[i, ours[i]]),
         "artifact": labels[theirs[i]], "artifact_score": float(probabilities[i, theirs[i]])}
        for i in np.flatnonzero(~agree)]
    check.confusion = confusion_matrix(rows, theirs, len(labels))
    limit = check.threshold
    problems = []
    if check.top1_agreement < limit.top1_agreement:
        problems.append(f"top-1 agreement {check.top1_agreement:.4f} < {limit.top1_agreement}")
    if limit.max_abs_diff is not None and check.max_abs_diff > limit.max_abs_diff:
        problems.append(f"max abs diff {check.max_abs_diff:.2e} > {limit.max_abs_diff:g}")
    check.status = FAILED if problems else PASSED
    check.reason = "; ".join(problems)
    if check.status == PASSED and check.too_few_images and not report.small_set_accepted:
        check.status, check.reason = INCONCLUSIVE, check.small_set_reason()
