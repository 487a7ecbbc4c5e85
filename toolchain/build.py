"""``toolchain build``: the whole chain, from an image folder to verified artifacts.

Steps: validate every option (before any work) → bottlenecks (cached) → retrain into
``OUTPUT/model`` → export each requested target into ``OUTPUT`` → verify every artifact that was
written against the retrained model on the held-out split, with reports in ``OUTPUT``. Each
artifact is written under a temporary name and renamed when complete. A target that fails does
not stop the others; the build reports each failure in one line and exits non-zero. Otherwise
the build exits with the verifier's code: 0 when every check passed, 1 when any failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from targets import ArtifactMetadata, Target
from toolchain import atomic
from toolchain.backbones import Backbone
from toolchain.convert import Conversion, convert, source_from_model
from toolchain.dataset import Dataset, labels_text
from toolchain.distortions import Distortions
from toolchain.retrain import RetrainResult, TrainingOptions, retrain
from toolchain.verify import HeldOut, Report, VerifyOptions, verify


@dataclass(frozen=True)
class BuildResult:
    """The retraining outcome and one conversion per requested target."""

    output_dir: Path
    retrained: RetrainResult
    conversions: tuple[Conversion, ...]

    @property
    def ok(self) -> bool:
        return all(conversion.ok for conversion in self.conversions)


def build(dataset: Dataset, backbone: Backbone, cache_dir: Path, output_dir: Path,
          jobs: list[tuple[Target, object]], metadata: ArtifactMetadata,
          options: TrainingOptions = TrainingOptions(), distortions: Distortions = Distortions(),
          progress: bool = True) -> BuildResult:
    """Retrain, then export every (target, options); the model goes to ``output_dir/model``."""
    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    retrained = retrain(dataset, backbone, cache_dir, model_dir, options, distortions,
                        summaries_dir=model_dir / "summaries", progress=progress)
    # Converted from what was written, not from the in-memory model: the artifacts then come
    # from exactly the files a later `toolchain convert --model` would read.
    source = source_from_model(model_dir)
    conversions = convert(source, jobs, metadata, output_dir)
    atomic.write_text(output_dir / "labels.txt", labels_text(retrained.info.labels))
    return BuildResult(output_dir, retrained, tuple(conversions))


def verify_build(result: BuildResult, dataset: Dataset, options: VerifyOptions) -> Report:
    """Verify every artifact the build wrote on the dataset's held-out split."""
    from toolchain.errors import DatasetError

    entries = tuple(dataset.subset("testing"))
    if not entries:
        raise DatasetError(f"{dataset.root} has no held-out (testing) images, so the artifacts "
                           "cannot be verified",
                           hint="add images or raise --testing-percentage")
    artifacts = [item.path for item in result.conversions if item.ok]
    return verify(result.output_dir / "model", artifacts, HeldOut(entries, dataset.root), options)
