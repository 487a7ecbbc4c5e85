"""``toolchain build``: the whole chain, from an image folder to verified artifacts and reports.

Steps: bottlenecks (cached) → retrain into ``OUTPUT/model`` → export each requested target into
``OUTPUT`` → verify every artifact that was written against the retrained model on the held-out
split → write ``report.json``, ``report.md``, ``junit.xml`` and ``confusion/`` into ``OUTPUT``.
Each artifact is written under a temporary name and renamed when complete. A target that fails
does not stop the others; the result records each failure in one line. The exit code is 2 when
a target failed, else the verifier's: 0 when every check passed, 1 when any failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from targets import ArtifactMetadata, Target
from toolchain import atomic
from toolchain.backbones import Backbone
from toolchain.conversion import Conversion, convert, source_from_model
from toolchain.dataset import Dataset, labels_text
from toolchain.distortions import Distortions
from toolchain.errors import EXIT_ERROR, DatasetError
from toolchain.options import Options
from toolchain.training import OutputOptions, RetrainResult, TrainingOptions, retrain
from toolchain.verification import HeldOut, Report, VerifyOptions, verify


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
    def exit_code(self) -> int:
        if not all(item.ok for item in self.conversions) or self.report is None:
            return EXIT_ERROR
        return self.report.exit_code


def build(dataset: Dataset, backbone: Backbone, *, cache_dir: Path, output_dir: Path,
          jobs: list[tuple[Target, Options]], metadata: ArtifactMetadata,
          training: TrainingOptions = TrainingOptions(),
          distortions: Distortions = Distortions(), outputs: OutputOptions = OutputOptions(),
          verification: VerifyOptions = VerifyOptions(), progress: bool = True,
          require_cached: bool = False) -> BuildResult:
    """Retrain into ``output_dir/model``, export every (target, options), verify, report."""
    from toolchain import report as report_io

    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    # Checked before the long work: a build that cannot verify must not train for an hour.
    held = tuple(dataset.subset("testing"))
    if not held:
        raise DatasetError(f"{dataset.root} has no held-out (testing) images, so the artifacts "
                           "could not be verified",
                           hint="add images or raise --testing-percentage")
    retrained = retrain(dataset, backbone, cache_dir=cache_dir, output_dir=model_dir,
                        training=training, distortions=distortions, outputs=outputs,
                        progress=progress, require_cached=require_cached)
    # Converted from what was written, not from the in-memory model: the artifacts then come
    # from exactly the files a later `toolchain convert --model` would read.
    conversions = tuple(convert(source_from_model(model_dir), jobs, metadata, output_dir))
    atomic.write_text(output_dir / "labels.txt", labels_text(retrained.info.labels))
    written = [item.path for item in conversions if item.ok]
    if not written:
        return BuildResult(output_dir, retrained, conversions)
    report = verify(model_dir, written, HeldOut(held, dataset.root), verification)
    files = report_io.write(report, output_dir)
    return BuildResult(output_dir, retrained, conversions, report, files)
