"""One verifier check: an artifact in one runtime, compared with the original, and its status.

A check's status is ``passed``, ``failed``, ``skipped`` (no runtime here, with ``allow_skip``),
``measured`` (a full-size row's figures without a verdict) or ``inconclusive``: it met its
threshold on too few images to show it (:func:`statistics.images_needed`). The run's verdict
over its checks is :attr:`toolchain.verification.Report.verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.statistics import Threshold, images_needed

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
#: A check that met its threshold on too few images to show it (and the run's verdict when no
#: check failed but one is inconclusive): never a pass, never a failure.
INCONCLUSIVE = "inconclusive"
#: A full-size row's figures without a verdict (no ``full_size_agreement`` given): shown, never
#: a pass, never a failure.
MEASURED = "measured"
#: ``Check.input``: our resized pixels, or the photo at its own size (the runtime resizes).
RESIZED, FULL_SIZE = "resized", "full-size"


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
    #: Images compared (0 when the check has no figures).
    images: int = 0
    top1_agreement_interval: tuple[float, float] | None = None
    accuracy_interval: tuple[float, float] | None = None
    #: ``resized`` (our pixels) or ``full-size`` (the photo; the runtime resizes it).
    input: str = RESIZED
    #: A device row's compute precision (``float16``: a phone's GPU or Neural Engine,
    #: emulated); None: the artifact as stored.
    compute: str | None = None

    @property
    def name(self) -> str:
        return f"{self.shown or self.path.name} [{self.runtime}]"

    @property
    def images_needed(self) -> int | None:
        """The fewest images on which this check's threshold means something (None: any)."""
        return images_needed(self.threshold.top1_agreement)

    @property
    def too_few_images(self) -> bool:
        needed = self.images_needed
        return (self.top1_agreement is not None and self.status != MEASURED
                and needed is not None and self.images < needed)

    def small_set_reason(self) -> str:
        """Why a check that met its threshold on too few images is inconclusive."""
        return (f"met {self.threshold.top1_agreement:g} on {self.images} images, too few to "
                f"show it ({self.images_needed} would allow two disagreements)")

    def record(self) -> dict:
        return {"target": self.target, "path": str(self.path), "runtime": self.runtime,
                "precision": self.precision, "compute": self.compute, "input": self.input,
                "status": self.status,
                "passed": self.status == PASSED, "reason": self.reason, "images": self.images,
                "top1_agreement": self.top1_agreement,
                "top1_agreement_interval": interval_pair(self.top1_agreement_interval),
                "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.mean_abs_diff, "accuracy": self.accuracy,
                "accuracy_interval": interval_pair(self.accuracy_interval),
                "threshold": self.threshold.record(),
                "images_needed": self.images_needed, "too_few_images": self.too_few_images,
                "per_class_agreement": self.per_class_agreement,
                "disagreements": self.disagreements,
                "confusion_matrix": None if self.confusion is None else self.confusion.tolist(),
                "seconds": round(self.seconds, 3)}


def interval_pair(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval as report.json stores it: a list of two floats, or None."""
    return None if interval is None else [float(interval[0]), float(interval[1])]
