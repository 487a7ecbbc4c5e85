"""The toolchain's commands: one frozen keyword-only options class and one run function each.

``SampleDataCommand`` → :func:`run_sample_data`, ``BuildCommand`` → :func:`run_build`, and so on.
The options nest the stages' own options (``TrainingOptions``, ``SplitOptions``, each target's
options, ...) as groups; :mod:`toolchain.options` turns them into the command-line flags
(:mod:`toolchain.cli`) and the keywords of the Python API (:mod:`toolchain`), which are both thin
layers over exactly these functions. A run function validates (the options did, when built),
calls its stages and returns a result object; it prints nothing but progress bars and what a
flag asks it to print. Errors are typed (:mod:`toolchain.errors`).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass
from pathlib import Path

import targets
from targets import ArtifactMetadata
from toolchain import atomic
from toolchain.backbones import BackboneOptions
from toolchain.conversion import GraphOptions
from toolchain.dataset import SplitOptions
from toolchain.distortions import Distortions
from toolchain.errors import UsageError
from toolchain.options import Options, given, group, option
from toolchain.training import OutputOptions, TrainingOptions
from toolchain.verification import VerifyOptions

_CACHE = "$XDG_CACHE_HOME/toolchain/bottlenecks, else ~/.cache/toolchain/bottlenecks"
_TRAINING = "training (retrain.py's flags and defaults)"
_VERIFICATION = "verification (thresholds per precision, read from each artifact)"
_METADATA = "metadata written into every artifact"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolchain" / "bottlenecks"


def _target_help() -> str:
    return f"{', '.join(targets.names())} or all; repeatable"


def _targets_option():
    return option(MISSING, _target_help, flag="target", append=True, metavar="NAME",
                  title="targets")


def _target_options():
    return group(factory=targets.default_options)



@dataclass(frozen=True, kw_only=True)
class SampleDataCommand(Options):
    """``toolchain sample-data OUT_DIR``: the built-in demo dataset."""

    out_dir: Path = option(help="folder to write the photos into", positional=True)
    per_class: int | None = option(None, "images per class",
                                   shown_default="40 drawn; every image of CIFAR-10 (6000)")
    seed: int = option(0, "seed of the drawings")
    cifar10: str | None = option(
        None, "write CIFAR-10 instead of the drawn scenes: the path of the binary archive "
        "cifar-10-binary.tar.gz, or 'download' to fetch it once into the cache",
        metavar="ARCHIVE", shown_default="off")
    progress: bool = option(True, "progress bars (on a terminal)", cli=False)

    def validate(self) -> None:
        if self.cifar10 is not None and self.seed != 0:
            raise UsageError("--seed draws the built-in scenes; CIFAR-10 has no seed",
                             hint="drop --seed or --cifar10")


@dataclass(frozen=True, kw_only=True)
class CacheCommand(Options):
    """What every command that reads the bottleneck cache takes: the folder, its split, the
    backbone, the cache and the distortions (``bottlenecks``, ``retrain``, ``build``)."""

    image_dir: Path = option(help="folder with one sub-folder of images per class",
                             title="data")
    split: SplitOptions = group(SplitOptions(), title="data")
    backbone: BackboneOptions = group(BackboneOptions(), title="backbone and cache")
    bottleneck_dir: Path | None = option(None, "bottleneck cache", shown_default=_CACHE,
                                         title="backbone and cache")
    distortions: Distortions = group(Distortions(), title="distortions (training images only)")
    progress: bool = option(True, "progress bars (on a terminal)", cli=False)

    @property
    def cache_dir(self) -> Path:
        return self.bottleneck_dir or default_cache_dir()


_SHARDS = "job arrays (one shared cache, N workers)"


@dataclass(frozen=True, kw_only=True)
class BottlenecksCommand(CacheCommand):
    """``toolchain bottlenecks``: fill the bottleneck cache, all of it or one shard; or say how
    much of it is there (``--status``)."""

    shard: str | None = option(
        None, "compute only shard I of N (I from 0 to N-1), chosen by each image's content "
        "hash: N of these at once, e.g. a job array, fill one shared cache", metavar="I/N",
        shown_default="every image", title=_SHARDS)
    status: bool = option(False, "compute nothing: say how many of the folder's bottlenecks "
                          "are cached and which shards are incomplete; exit 1 if any is "
                          "missing", title=_SHARDS)
    shards: int = option(1, "with --status: the N of the job array to report on",
                         title=_SHARDS)

    def validate(self) -> None:
        from toolchain.cache import Shard

        if self.shard is not None:
            Shard.parse(self.shard)
            if self.status:
                raise UsageError("--status reports on every shard; drop --shard",
                                 hint="pass --shards N to see which of N shards are incomplete")
        if self.shards < 1:
            raise UsageError("--shards must be at least 1")
        if self.shards != 1 and not self.status:
            raise UsageError("--shards applies to --status only",
                             hint="to compute one shard pass --shard I/N")


@dataclass(frozen=True, kw_only=True)
class RetrainCommand(CacheCommand):
    """``toolchain retrain``: bottlenecks, then the last layer, then the model folder."""

    require_cached: bool = option(
        False, "compute no bottleneck: fail, naming what is missing, if the cache lacks any "
        "(after a sharded extraction)", title="backbone and cache")
    output_dir: Path = option(help="where the retrained model, labels.txt and split.json go",
                              title="output")
    training: TrainingOptions = group(TrainingOptions(), title=_TRAINING)
    outputs: OutputOptions = group(OutputOptions(), title=_TRAINING)


@dataclass(frozen=True, kw_only=True)
class ConvertCommand(Options):
    """``toolchain convert``: a retrained model (or a frozen graph) into app-ready artifacts."""

    model: Path | None = option(None, "a retrain or build output folder",
                                title="model to convert (one of)")
    graph: Path | None = option(None, "a TensorFlow for Poets frozen graph (.pb)",
                                title="model to convert (one of)")
    graph_options: GraphOptions = group(GraphOptions(),
                                        title="frozen graphs (.pb), with retrain.py's defaults")
    image_dir: Path | None = option(None, "training images that calibrate int8",
                                    shown_default="the model's recorded training split")
    output_dir: Path | None = option(None, "where the artifacts go", shown_default="beside "
                                     "the model")
    targets: tuple[str, ...] = _targets_option()
    target_options: Options = _target_options()
    metadata: ArtifactMetadata = group(ArtifactMetadata(), title=_METADATA)

    def validate(self) -> None:
        if (self.model is None) == (self.graph is None):
            raise UsageError("pass exactly one of --model and --graph")
        if self.model is not None and given(self.graph_options):
            raise UsageError("--labels, --input-name, --output-name, --input-mean and "
                             "--input-std apply to --graph only",
                             hint="a retrained model carries its labels and preprocessing")
        self.jobs()

    def jobs(self):
        return targets.jobs(self.targets, self.target_options)


@dataclass(frozen=True, kw_only=True)
class BuildCommand(RetrainCommand):
    """``toolchain build``: retrain, convert and verify, end to end."""

    output_dir: Path = option(Path("toolchain-build"),
                              "where the model, artifacts and reports go", title="output")
    targets: tuple[str, ...] = _targets_option()
    target_options: Options = _target_options()
    metadata: ArtifactMetadata = group(ArtifactMetadata(), title=_METADATA)
    verification: VerifyOptions = group(VerifyOptions(), title=_VERIFICATION)
    verify_images: Path | None = option(None, "verify on every photo under DIR, not the "
                                        "held-out split: as many as the thresholds need (no "
                                        "labels needed)", metavar="DIR", title=_VERIFICATION)

    def validate(self) -> None:
        self.jobs()

    def jobs(self):
        """Each target's options, its repair aimed at this build's verifier thresholds."""
        thresholds = self.verification.thresholds
        return [(target, options.aimed_at(thresholds))
                for target, options in targets.jobs(self.targets, self.target_options)]


@dataclass(frozen=True, kw_only=True)
class VerifyCommand(Options):
    """``toolchain verify``: check converted models against the original, on the recorded
    held-out split (``--image-dir``) or on any folder of photos (``--images``)."""

    model: Path = option(help="the original: a retrain or build output folder, a frozen graph "
                              "(.pb) or a .keras file")
    graph: GraphOptions = group(GraphOptions(), title="an original that is a frozen graph (.pb) "
                                                      "or a .keras file")
    artifacts: tuple[Path, ...] = option(
        MISSING, ".tflite, .mlmodel or .mlpackage files to check (repeatable)", flag="artifact",
        nargs="+", metavar="PATH")
    images: Path | None = option(None, "any folder of photos (class folders named after the "
                                       "model's labels give accuracy too)", metavar="DIR",
                                 title="held-out images (one of)")
    image_dir: Path | None = option(None, "the image folder a retrain or build folder was "
                                          "trained on: its recorded held-out (testing) split",
                                    title="held-out images (one of)")
    report_dir: Path | None = option(None, "where report.json, report.md, junit.xml and "
                                           "confusion/ go",
                                     shown_default="the first artifact's folder")
    verification: VerifyOptions = group(VerifyOptions(), title=_VERIFICATION)

    def validate(self) -> None:
        from toolchain import originals

        if not self.artifacts:
            raise UsageError("nothing to verify", hint="pass --artifact PATH (repeatable)")
        if (self.images is None) == (self.image_dir is None):
            raise UsageError("pass exactly one of --images and --image-dir",
                             hint="--images DIR: any folder of photos; --image-dir DIR: the "
                                  "folder a retrain or build folder was trained on")
        if self.image_dir is not None and originals.kind_of(self.model) != originals.RETRAINED:
            raise UsageError(f"--image-dir reads the recorded split of a retrain or build "
                             f"folder, and {self.model.name} has none",
                             hint="pass --images DIR: any folder of photos")
        originals.check_graph_options(self.model, self.graph)


@dataclass(frozen=True, kw_only=True)
class LabelCommand(Options):
    """``toolchain label``: the top labels of one image."""

    model: Path = option(help="a retrain output folder, .tflite, .mlmodel, .mlpackage or .pb")
    image: Path = option(help="the image to classify")
    top_k: int = option(5, "how many labels to show, best first")
    graph: GraphOptions = group(GraphOptions(), title="frozen graphs (.pb), with retrain.py's "
                                                      "defaults")

    def validate(self) -> None:
        if self.top_k < 1:
            raise UsageError("--top-k must be at least 1")


@dataclass(frozen=True, kw_only=True)
class InstallCommand(Options):
    """``toolchain install``: copy a built model into a sample app."""

    app: str = option(help="ios: sample_apps/ios (Core ML); android: sample_apps/android "
                           "(TFLite)", choices=("ios", "android"))
    source: Path = option(help="the --output-dir of `toolchain build`, or one model file",
                          flag="from")
    apps_dir: Path | None = option(None, "the sample_apps folder",
                                   shown_default="./sample_apps, if there is one")
    allow_unverified: bool = option(False, "install even when no passing verification covers "
                                           "the model's bytes (a warning, and the app's "
                                           "verification record says so)")


@dataclass(frozen=True, kw_only=True)
class BenchCommand(Options):
    """``toolchain bench``: measure the whole chain and print one table."""

    architectures: tuple[str, ...] = option(
        (), "extraction benchmark, repeatable", flag="architecture", append=True,
        shown_default="mobilenet_0.50_224, mobilenet_v2_1.0_224, inception_v3")
    chain_architecture: str = option("mobilenet_0.50_224",
                                     "the backbone retrained, converted and timed")
    weights: str = option("none", "none (offline: same FLOPs as ImageNet), imagenet or a .h5 "
                                  "file")
    image_dir: Path | None = option(None, "images to use", shown_default="the sample data")
    images: int = option(240, "images to time extraction on")
    repeats: int = option(3, "runs per figure; the median is shown")
    steps: int = option(4000, "training steps timed (retrain.py's default)")
    latency_runs: int = option(50, "one-image calls per latency figure")
    only: str | None = option(None, "run one part", choices=("extraction", "chain", "mlmodel"))
    mlmodel_architecture: str = option(
        "inception_v3", "the backbone whose float32 .mlmodel conversion and parse are timed "
                        "against the goals (60 s, 5 s)")
    scale: bool = option(False, "instead: each stage's time and peak memory on folders of "
                         "--scale-size small photos (scan, extraction, warm cache, retrain, "
                         "cache size), with --chain-architecture and --steps")
    scale_sizes: tuple[int, ...] = option((), "with --scale: a folder size, repeatable",
                                          flag="scale_size", append=True,
                                          shown_default="1000, 10000, 60000")
    json: Path | None = option(None, "also write the figures here")

    def validate(self) -> None:
        if self.images < 8 or self.repeats < 1:
            raise UsageError("--images must be at least 8 and --repeats at least 1")
        if self.scale_sizes and not self.scale:
            raise UsageError("--scale-size applies to --scale only")
        if self.scale and (self.only or any(size < 20 for size in self.scale_sizes)):
            raise UsageError("--scale runs alone (no --only), on folders of 20 images or more")
        if self.steps < 1 or self.latency_runs < 2:
            raise UsageError("--steps must be at least 1 and --latency-runs at least 2")
        from toolchain import backbones

        for name in (*self.architectures, self.chain_architecture, self.mlmodel_architecture):
            backbones.get(name)  # an unknown name fails here, before any work



@dataclass(frozen=True)
class BottlenecksResult:
    """What ``bottlenecks`` did: the backbone, the cache, counts, and what it skipped."""

    architecture: str
    cache_dir: Path
    cached: int
    computed: int
    images_per_second: float
    skipped: int
    shard: str | None = None
    #: Vectors left to the other shards.
    elsewhere: int = 0
    #: With ``--status``: the cache's state (``toolchain.cache.CacheStatus``); nothing computed.
    status: object = None

    @property
    def exit_code(self) -> int:
        from toolchain.errors import EXIT_CHECK_FAILED

        return EXIT_CHECK_FAILED if self.status is not None and not self.status.complete else 0


def run_sample_data(command: SampleDataCommand):
    """Write the built-in demo dataset; a SampleDataSummary."""
    if command.cifar10 is not None:
        from toolchain.cifar10 import write_cifar10

        return write_cifar10(command.cifar10, command.out_dir, per_class=command.per_class,
                             progress=command.progress)
    from toolchain.sample_photos import write_sample_data

    return write_sample_data(command.out_dir, per_class=command.per_class or 40,
                             seed=command.seed)


def run_bottlenecks(command: BottlenecksCommand) -> BottlenecksResult:
    from toolchain.cache import BottleneckCache, Shard, extract, status
    from toolchain.dataset import scan
    from toolchain.training import bottleneck_jobs

    dataset = scan(command.image_dir, command.split)
    backbone = command.backbone.load()
    cache = BottleneckCache(command.cache_dir, backbone)
    jobs = bottleneck_jobs(dataset, command.distortions)
    if command.status:
        found = status(jobs, cache, command.shards)
        return BottlenecksResult(backbone.spec.name, cache.dir, found.cached, 0, 0.0,
                                 len(dataset.skipped) + found.unreadable, status=found)
    shard = Shard.parse(command.shard) if command.shard is not None else None
    result = extract(jobs, cache, progress=command.progress, shard=shard, keep=False)
    return BottlenecksResult(backbone.spec.name, cache.dir, result.cached, result.computed,
                             result.images_per_second,
                             len(dataset.skipped) + len(result.failures),
                             command.shard, result.elsewhere)


def run_retrain(command: RetrainCommand):
    """Bottlenecks, training and the model folder; a RetrainResult."""
    from toolchain.dataset import scan
    from toolchain.training import retrain

    dataset = scan(command.image_dir, command.split)
    with atomic.exclusive(command.output_dir, "retrain"):
        return retrain(dataset, command.backbone.load(), cache_dir=command.cache_dir,
                       output_dir=command.output_dir, training=command.training,
                       distortions=command.distortions, outputs=command.outputs,
                       progress=command.progress, require_cached=command.require_cached)


@dataclass(frozen=True)
class ConvertResult:
    """One conversion per requested target, in order."""

    output_dir: Path
    conversions: tuple

    @property
    def artifacts(self) -> list[Path]:
        return [item.path for item in self.conversions if item.ok]

    @property
    def ok(self) -> bool:
        return all(item.ok for item in self.conversions)

    @property
    def exit_code(self) -> int:
        from toolchain.errors import EXIT_ERROR

        return 0 if self.ok else EXIT_ERROR


def run_convert(command: ConvertCommand) -> ConvertResult:
    from toolchain.conversion import convert, source_from_graph, source_from_model

    jobs = command.jobs()
    if command.graph is not None:
        source = source_from_graph(command.graph, command.graph_options, command.image_dir)
        out = command.output_dir or command.graph.parent
    else:
        source = source_from_model(command.model, command.image_dir)
        out = command.output_dir or command.model
    with atomic.exclusive(out, "convert"):
        return ConvertResult(Path(out), tuple(convert(source, jobs, command.metadata, out)))


@dataclass(frozen=True)
class VerifyResult:
    """The verifier's report and the files it was written to; its verdict (``passed``,
    ``failed`` or ``inconclusive``)."""

    report: object
    files: dict

    @property
    def verdict(self) -> str:
        return self.report.verdict

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


def run_verify(command: VerifyCommand) -> VerifyResult:
    from toolchain import report as report_io
    from toolchain.originals import open_original
    from toolchain.verification import held_out, images_in, verify

    for path in command.artifacts:  # before the original loads: a typo fails at once
        if not Path(path).exists():
            raise UsageError(f"artifact {path} does not exist")
    original = open_original(command.model, command.graph)
    if command.images is not None:
        held = images_in(command.images, original.labels)
    else:
        held = held_out(command.image_dir, original.model_dir)
    report = verify(original, list(command.artifacts), held, command.verification)
    folder = command.report_dir or Path(command.artifacts[0]).parent
    return VerifyResult(report, report_io.write(report, folder))


def run_build(command: BuildCommand):
    """The whole chain; a BuildResult (``passed``, ``artifacts``, ``report``)."""
    from toolchain.chain import build
    from toolchain.dataset import scan

    jobs = command.jobs()
    dataset = scan(command.image_dir, command.split)
    return build(dataset, command.backbone.load(), cache_dir=command.cache_dir,
                 output_dir=command.output_dir, jobs=jobs, metadata=command.metadata,
                 training=command.training, distortions=command.distortions,
                 outputs=command.outputs, verification=command.verification,
                 verify_images=command.verify_images, progress=command.progress,
                 require_cached=command.require_cached)


def run_label(command: LabelCommand):
    """The top-k labels of one image; a list of Prediction (label, score), best first."""
    from toolchain.classification import classify

    return classify(command.model, command.image, command.top_k, command.graph)


def run_install(command: InstallCommand):
    """Copy the build's model into the sample app; an Installed record."""
    from toolchain.apps import install

    return install(command.app, command.source, command.apps_dir, command.allow_unverified)


def run_bench(command: BenchCommand) -> dict:
    """Measure extraction and the whole chain, printing each table as it is done."""
    from toolchain.bench import run_bench as bench

    return bench(command)


#: Each command's options class and run function, by command-line name.
COMMANDS = {
    "sample-data": (SampleDataCommand, run_sample_data),
    "bottlenecks": (BottlenecksCommand, run_bottlenecks),
    "retrain": (RetrainCommand, run_retrain),
    "convert": (ConvertCommand, run_convert),
    "build": (BuildCommand, run_build),
    "verify": (VerifyCommand, run_verify),
    "label": (LabelCommand, run_label),
    "install": (InstallCommand, run_install),
    "bench": (BenchCommand, run_bench),
}
