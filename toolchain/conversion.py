"""The converter stage: turn the retrained model into every requested artifact.

Steps: build a :class:`targets.Source` (from a retrain output directory, or from a TensorFlow
for Poets frozen graph) → for each target: export atomically under its final name → record
what was written. A target that fails does not stop the others; its failure is returned as one
line naming the target and the cause, and the caller exits non-zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from targets import ArtifactMetadata, Source, Target
from toolchain import __version__, atomic, graphs
from toolchain import model as model_io
from toolchain.dataset import read_labels
from toolchain.errors import ModelError, ToolchainError, UsageError, first_line
from toolchain.options import Options, option

log = logging.getLogger("toolchain")


def source_from_model(path: Path, image_dir: Path | None = None) -> Source:
    """The retrained model at ``path``; calibration images are its recorded training split."""
    folder = model_io.find_dir(path)
    info = model_io.load_info(folder)
    calibration: tuple[Path, ...] = ()
    tuning: tuple[Path, ...] = ()
    try:
        split = model_io.read_split(folder)
        calibration, tuning = (split.images(name, image_dir) for name in ("training",
                                                                          "validation"))
    except ModelError as error:
        # Converting needs no images: float variants convert without them, and int8 says it
        # has no calibration images in one line of its own.
        log.warning("%s; no calibration images are known", first_line(error))
    user_defined = {
        "architecture": info.architecture,
        "toolchain_version": __version__,
        "classes": str(len(info.labels)),
        "test_accuracy": "n/a" if info.test_accuracy is None else f"{info.test_accuracy:.4f}",
        "weights": info.weights,
    }
    spec = info.spec
    # A model on a frozen-graph backbone is its retrained_graph.pb (see toolchain.model).
    model = ({"function_factory": model_io.graph_function_factory(folder, info)} if info.is_graph
             else {"keras_model": model_io.load_keras(folder)})
    return Source(labels=info.labels, input_size=spec.input_size,
                  preprocessing=spec.preprocessing, architecture=info.architecture,
                  user_defined=user_defined, calibration=calibration, tuning=tuning,
                  normalization_source=f"the {info.architecture} backbone's preprocessing",
                  **model)


@dataclass(frozen=True, kw_only=True)
class GraphOptions(Options):
    """How to read a TensorFlow for Poets frozen graph (retrain.py's names; the normalisation
    read from the graph or retrain.py's defaults for the detected architecture)."""

    labels: Path | None = option(None, "the graph's labels file, one label per line",
                                 shown_default="retrained_labels.txt or labels.txt beside it")
    input_name: str | None = option(None, "the graph's image input tensor",
                                    shown_default="input (TF for Poets 2), else Mul (TF for "
                                                  "Poets 1)")
    output_name: str = option(graphs.OUTPUT, "the graph's probabilities tensor")
    input_mean: float | None = option(
        None, "pixel value that maps to 0 (input = (pixel - mean) / std)",
        shown_default="the graph's Sub/Mul constants, else retrain.py's default for the "
                      "detected architecture (MobileNet 127.5, Inception V3 128)")
    input_std: float | None = option(None, "pixel range that maps to 1",
                                     shown_default="as --input-mean")

    def validate(self) -> None:
        if self.input_std is not None and not self.input_std > 0:
            raise UsageError("--input-std must be positive")


def graph_labels_path(graph: Path, labels: Path | None = None) -> Path:
    """The labels of a frozen graph: ``--labels``, else retrain.py's file names beside it."""
    if labels is not None:
        return Path(labels)
    for name in ("retrained_labels.txt", "labels.txt", "output_labels.txt"):
        candidate = Path(graph).parent / name
        if candidate.is_file():
            return candidate
    raise UsageError(f"no labels file found beside {graph}", hint="pass --labels PATH")


def load_graph(graph: Path, options: GraphOptions = GraphOptions()) -> graphs.FrozenGraph:
    """The frozen graph cut to its image input (:func:`toolchain.graphs.load`); logs the
    normalisation used and where it came from, and warns when it is a guess."""
    frozen = graphs.load(graph, input_name=options.input_name, output_name=options.output_name,
                         mean=options.input_mean, std=options.input_std)
    norm = frozen.normalization
    if norm.guess:
        log.warning("%s; %s is not a known retrain.py architecture, so this is a guess",
                    norm.line, Path(graph).name)
        log.warning("hint: pass --input-mean and --input-std as the graph was trained "
                    "(label_image.py of TF for Poets 2 used 128 and 128)")
    else:
        log.info("%s", norm.line)
    if norm.conflict:
        log.warning("%s, but the flags override them: the artifacts will not compute what the "
                    "graph computes on its own JPEG input", norm.conflict)
    if frozen.removed_inputs:
        log.info("%s: image input %s (%s, %d px); no longer inputs: %s", Path(graph).name,
                 frozen.input_name, frozen.architecture, frozen.input_size,
                 ", ".join(frozen.removed_inputs))
    return frozen


def source_from_graph(graph: Path, options: GraphOptions = GraphOptions(),
                      image_dir: Path | None = None) -> Source:
    """A frozen GraphDef (``retrained_graph.pb``) and its labels file, cut to one image input
    (:mod:`toolchain.graphs`). The normalisation and its source are recorded in
    ``user_defined`` (so every artifact carries them) and on the Source."""
    from toolchain.dataset import scan

    labels = read_labels(graph_labels_path(graph, options.labels))
    frozen = load_graph(graph, options)
    norm = frozen.normalization
    calibration = tuning = ()
    if image_dir is not None:
        # The graph's head never saw this folder: no image is its training image, so the
        # testing split may tune too, after the validation split (targets/_tuning.py).
        dataset = scan(Path(image_dir))
        calibration, tuning = (tuple(entry.path for name in names
                                     for entry in dataset.subset(name))
                               for names in (("training",), ("validation", "testing")))
    user_defined = {"architecture": frozen.architecture, "graph": Path(graph).name,
                    "graph_input": frozen.input_name, "graph_output": frozen.output_name,
                    "input_mean": f"{norm.mean:g}", "input_std": f"{norm.std:g}",
                    "normalization_source": norm.source,
                    "toolchain_version": __version__, "classes": str(len(labels))}
    return Source(labels=labels, input_size=frozen.input_size,
                  preprocessing=norm.preprocessing,
                  architecture=f"{frozen.architecture} (frozen graph {Path(graph).name})",
                  user_defined=user_defined, calibration=calibration, tuning=tuning,
                  function_factory=frozen.function_factory(),
                  normalization_source=norm.source, fit_on_images=False)


@dataclass(frozen=True)
class Conversion:
    """One target's outcome: the artifact written, or the one-line reason it was not."""

    target: str
    path: Path | None
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.path is not None


def convert(source: Source, jobs: list[tuple[Target, object]], metadata: ArtifactMetadata,
            out_dir: Path) -> list[Conversion]:
    """Export every (target, options) into ``out_dir``; failures are recorded, not raised."""
    out_dir = Path(out_dir)
    atomic.check_writable(out_dir)
    atomic.sweep(out_dir)
    results = []
    for target, options in jobs:
        start = time.perf_counter()
        path = out_dir / target.filename(options)
        log.info("%s: converting to %s", target.name, path.name)
        try:
            target.export(source, options, metadata, path)
            results.append(Conversion(target.name, path, time.perf_counter() - start))
            results.extend(Conversion(target.name, extra, 0.0) for extra in target.companions(path))
        except ToolchainError as error:
            results.append(Conversion(target.name, None, time.perf_counter() - start,
                                      error.message))
        except Exception as error:  # a converter crash must not lose the other targets
            log.debug("target %s failed", target.name, exc_info=True)
            results.append(Conversion(target.name, None, time.perf_counter() - start,
                                      f"{type(error).__name__}: {first_line(error)}"))
    return results
