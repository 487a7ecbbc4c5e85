"""The converter stage: turn the retrained model into every requested artifact.

Steps: build a :class:`targets.Source` (from a retrain output directory, or from a TensorFlow
for Poets frozen graph) → for each target: export atomically under its final name → record
what was written. A target that fails does not stop the others; its failure is returned as one
line naming the target and the cause, and the caller exits non-zero.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from targets import ArtifactMetadata, Source, Target
from toolchain import __version__, atomic
from toolchain import model as model_io
from toolchain.backbones import Preprocessing
from toolchain.dataset import read_labels
from toolchain.errors import ModelError, ToolchainError, UsageError, first_line
from toolchain.options import Options, option

log = logging.getLogger("toolchain")


def source_from_model(path: Path, image_dir: Path | None = None) -> Source:
    """The retrained model at ``path``; calibration images are its recorded training split."""
    folder = model_io.find_dir(path)
    info = model_io.load_info(folder)
    calibration: tuple[Path, ...] = ()
    try:
        split = json.loads((folder / model_io.SPLIT_FILE).read_text(encoding="utf-8"))
        root = Path(image_dir) if image_dir else Path(split["image_dir"])
        calibration = tuple(root / rel for rel in split["sets"]["training"]
                            if (root / rel).is_file())
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        log.warning("%s has no readable split record; no calibration images are known",
                    folder / model_io.SPLIT_FILE)
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
                  user_defined=user_defined, calibration=calibration, **model)


@dataclass(frozen=True, kw_only=True)
class GraphOptions(Options):
    """How to read a TensorFlow for Poets frozen graph (retrain.py's defaults)."""

    labels: Path | None = option(None, "the graph's labels file, one label per line",
                                 shown_default="retrained_labels.txt or labels.txt beside it")
    input_name: str = option("input", "the graph's image input tensor")
    output_name: str = option("final_result", "the graph's probabilities tensor")
    input_mean: float = option(127.5, "pixel value that maps to 0 (input = (pixel - mean) / std)")
    input_std: float = option(127.5, "pixel range that maps to 1")

    def validate(self) -> None:
        if not self.input_std > 0:
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


def source_from_graph(graph: Path, options: GraphOptions = GraphOptions(),
                      image_dir: Path | None = None) -> Source:
    """A frozen GraphDef (``retrained_graph.pb``) and its labels file.

    The GraphDef is imported inside ``tf.compat.v1.wrap_function`` and pruned to the input and
    output tensors: coremltools 9 refuses a ``.pb`` path when TensorFlow 2 is installed, but
    accepts the resulting concrete function (checked with coremltools 9.0 and TF 2.13.1).
    """
    import tensorflow as tf

    from toolchain.dataset import scan

    labels = read_labels(graph_labels_path(graph, options.labels))
    try:
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(Path(graph).read_bytes())
    # protobuf raises DecodeError (an Exception)
    except (OSError, Exception) as error:  # noqa: BLE001
        raise ModelError(f"cannot read frozen graph {graph}: {error}") from error
    nodes = {node.name: node for node in graph_def.node}
    for name in (options.input_name, options.output_name):
        if name not in nodes:
            raise ModelError(f"{graph} has no tensor named {name!r}",
                             hint="pass --input-name / --output-name")
    shape = [dim.size for dim in nodes[options.input_name].attr["shape"].shape.dim]
    if len(shape) != 4 or shape[1] != shape[2] or shape[1] <= 0 or shape[3] != 3:
        raise ModelError(f"input {options.input_name!r} of {graph} has shape {shape}; "
                         "expected [1, size, size, 3]")
    size = shape[1]

    def factory():
        wrapped = tf.compat.v1.wrap_function(
            lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
        return wrapped.prune(wrapped.graph.get_tensor_by_name(f"{options.input_name}:0"),
                             wrapped.graph.get_tensor_by_name(f"{options.output_name}:0"))

    scale = 1.0 / options.input_std
    preprocessing = Preprocessing(scale, (-options.input_mean * scale,) * 3)
    calibration = ()
    if image_dir is not None:
        calibration = tuple(entry.path for entry in scan(Path(image_dir)).subset("training"))
    return Source(labels=labels, input_size=size, preprocessing=preprocessing,
                  architecture=f"frozen graph {Path(graph).name}",
                  user_defined={"architecture": f"frozen graph {Path(graph).name}",
                                "toolchain_version": __version__, "classes": str(len(labels))},
                  calibration=calibration, function_factory=factory)


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
        except ToolchainError as error:
            results.append(Conversion(target.name, None, time.perf_counter() - start,
                                      error.message))
        except Exception as error:  # a converter crash must not lose the other targets
            log.debug("target %s failed", target.name, exc_info=True)
            results.append(Conversion(target.name, None, time.perf_counter() - start,
                                      f"{type(error).__name__}: {first_line(error)}"))
    return results
