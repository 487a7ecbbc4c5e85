"""The original a verifier compares artifacts with: whatever model the user holds.

Three kinds, one interface (:class:`Original`: labels, input size, preprocessing and where it
came from, architecture, and :meth:`Original.probabilities` of uint8 pixels):

- ``retrained``: a retrain or build output folder (``model.json``, ``model.keras``); labels and
  preprocessing from its manifest, and a recorded split, so ``--image-dir`` can pick its
  held-out images;
- ``frozen-graph``: a TensorFlow for Poets ``.pb``, read by :func:`conversion.source_from_graph`
  with the same graph options as ``convert`` (``--labels``, ``--input-name``, ``--output-name``,
  ``--input-mean``, ``--input-std``), run image by image through its concrete function (its
  input placeholder holds one image);
- ``keras``: a ``.keras`` file, loaded with ``safe_mode`` (a data file never runs code); labels
  from ``--labels``, else a ``model.json`` beside it (one of ours), else ``retrained_labels.txt``
  or ``labels.txt`` beside it; input size from the model's input shape; normalisation from
  ``--input-mean``/``--input-std``, else that ``model.json``, else retrain.py's 127.5/127.5.

The verifier records which it was, and where its normalisation came from, in report.json: a
wrong mean/std in the original makes every artifact look wrong (or right) for the wrong reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain import model as model_io
from toolchain.backbones import Preprocessing
from toolchain.conversion import GraphOptions, graph_labels_path, source_from_graph
from toolchain.dataset import read_labels
from toolchain.errors import ModelError, UsageError, first_line
from toolchain.options import given
from toolchain.poets import DEFAULT_NORMALIZATION
from toolchain.untrusted import check_input_side, shown
from toolchain.untrusted.files import keras_format

log = logging.getLogger("toolchain")

RETRAINED, FROZEN_GRAPH, KERAS = "retrained", "frozen-graph", "keras"
#: Graph options each kind reads; any other given is refused (it would be ignored).
READS = {RETRAINED: (), FROZEN_GRAPH: ("labels", "input_name", "output_name", "input_mean",
                                       "input_std"),
         KERAS: ("labels", "input_mean", "input_std")}


@dataclass(frozen=True)
class Original:
    """The model artifacts are compared with; see the module docstring."""

    kind: str
    path: Path
    labels: tuple[str, ...]
    input_size: int
    preprocessing: Preprocessing
    #: Where ``preprocessing`` came from, in words (``model.json``, the flags, a default...).
    preprocessing_source: str
    architecture: str
    #: float32 preprocessed images (n, size, size, 3) → probabilities (n, classes).
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)
    #: How many images ``predict`` takes at once (None: any number).
    max_batch: int | None = None
    #: The retrain folder, whose recorded split ``--image-dir`` reads (retrained only).
    model_dir: Path | None = None

    def probabilities(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 RGB pixels (n, size, size, 3) → float32 probabilities, columns in label order."""
        step = min(batch_size, self.max_batch or batch_size)
        rows = [np.asarray(self.predict(self.preprocessing.apply(pixels[i:i + step])),
                           np.float32) for i in range(0, len(pixels), step)]
        out = np.concatenate(rows)
        if out.shape != (len(pixels), len(self.labels)):
            raise ModelError(f"the original {self.path.name} gives outputs of shape {out.shape} "
                             f"for {len(pixels)} images and {len(self.labels)} labels",
                             hint="check --labels (one label per output) and --output-name")
        return out

    def record(self) -> dict:
        pre = self.preprocessing
        return {"kind": self.kind, "path": str(self.path), "architecture": self.architecture,
                "input_size": self.input_size,
                "preprocessing": {"mean": list(pre.mean), "std": list(pre.std),
                                  "scale": pre.scale, "offset": list(pre.offset)},
                "preprocessing_source": self.preprocessing_source}


def kind_of(path: Path) -> str:
    """``frozen-graph`` for a ``.pb``, ``keras`` for a ``.keras`` file, else ``retrained``."""
    suffix = Path(path).suffix.lower()
    return {".pb": FROZEN_GRAPH, ".keras": KERAS}.get(suffix, RETRAINED)


def check_graph_options(path: Path, graph: GraphOptions) -> None:
    """Refuse graph options the original at ``path`` would ignore (one-line UsageError)."""
    kind = kind_of(path)
    ignored = [name for name in given(graph) if name not in READS[kind]]
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        what = {RETRAINED: "a retrained model carries its labels and preprocessing",
                KERAS: "a .keras file has no tensor names to choose"}.get(kind, "")
        verb = "does" if len(ignored) == 1 else "do"
        raise UsageError(f"{flags} {verb} not apply to {Path(path).name}: {what}",
                         hint="--input-name and --output-name are for frozen graphs (.pb)")


def open_original(path: Path, graph: GraphOptions = GraphOptions()) -> Original:
    """The original at ``path``, of whichever kind its name says."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist",
                         hint="--model takes a retrain or build folder, a .pb or a .keras file")
    check_graph_options(path, graph)
    kind = kind_of(path)
    if kind == FROZEN_GRAPH:
        return _frozen_graph(path, graph)
    if kind == KERAS:
        return _keras_file(path, graph)
    if path.is_file() and path.name not in (model_io.MANIFEST, model_io.KERAS_FILE):
        raise UsageError(f"--model {path} is not a model the verifier reads",
                         hint="pass a retrain or build output folder, a frozen graph (.pb) or "
                              "a .keras file")
    folder = model_io.find_dir(path)
    info, predict = model_io.predictor(folder)  # Keras, or a retrained frozen graph
    spec = info.spec
    return Original(RETRAINED, folder, tuple(info.labels), spec.input_size, spec.preprocessing,
                    f"model.json ({info.architecture})", info.architecture, predict, None,
                    folder)


#: retrain.py's MobileNet normalisation (poets.py's table), used for a ``.keras`` file when
#: nothing else says.
DEFAULT_MEAN_STD = DEFAULT_NORMALIZATION


def _flag_values(graph: GraphOptions) -> tuple[float, float]:
    mean = DEFAULT_MEAN_STD[0] if graph.input_mean is None else graph.input_mean
    std = DEFAULT_MEAN_STD[1] if graph.input_std is None else graph.input_std
    return mean, std


def _flag_normalisation(graph: GraphOptions) -> tuple[Preprocessing, bool]:
    """The preprocessing the mean/std options say (a missing one at its default), and whether
    either was given."""
    mean, std = _flag_values(graph)
    flagged = graph.input_mean is not None or graph.input_std is not None
    return Preprocessing(1.0 / std, (-mean / std,) * 3), flagged


def _flags_text(graph: GraphOptions) -> str:
    mean, std = _flag_values(graph)
    return f"--input-mean {mean:g} --input-std {std:g}"


def _default_text() -> str:
    mean, std = DEFAULT_MEAN_STD
    return (f"default (mean {mean:g}, std {std:g}, retrain.py's); pass "
            "--input-mean/--input-std if the model expects other")


def _frozen_graph(path: Path, graph: GraphOptions) -> Original:
    """A frozen graph as ``convert --graph`` reads it: the same cut, the same normalisation
    (flags, the graph's own Sub/Mul, retrain.py's defaults for its architecture), and the same
    words for where that came from (``Source.normalization_source``)."""
    import tensorflow as tf

    source = source_from_graph(path, graph, None)
    function = source.concrete_function()

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(function(tf.constant(batch, tf.float32)))  # pruned fns want tensors

    return Original(FROZEN_GRAPH, path, tuple(source.labels), source.input_size,
                    source.preprocessing, source.normalization_source, source.architecture,
                    predict, max_batch=1)


def _keras_file(path: Path, graph: GraphOptions) -> Original:
    import tensorflow as tf

    try:
        keras_format(path)  # a zip: an HDF5 file named .keras would load without safe mode
        keras_model = tf.keras.models.load_model(path, compile=False, safe_mode=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"cannot load {shown(str(path))}: {first_line(error, 200)}") from error
    shape = tuple(keras_model.input_shape)
    if len(shape) != 4 or shape[1] != shape[2] or not shape[1] or shape[3] != 3:
        raise ModelError(f"{path} takes input of shape {shape}; expected (batch, size, size, 3)")
    check_input_side(int(shape[1]), str(path))
    info = None
    if (path.parent / model_io.MANIFEST).is_file():
        try:
            info = model_io.load_info(path.parent)
        except ModelError as error:
            log.warning("ignoring %s beside %s: %s", model_io.MANIFEST, path.name, error.message)
    if graph.labels is not None:
        labels = read_labels(graph.labels)
    elif info is not None:
        labels = tuple(info.labels)
    else:
        labels = read_labels(graph_labels_path(path))
    classes = keras_model.output_shape[-1]
    if classes != len(labels):
        raise ModelError(f"{path.name} has {classes} outputs but its labels file has "
                         f"{len(labels)} labels", hint="pass --labels PATH")
    preprocessing, flagged = _flag_normalisation(graph)
    if flagged:
        where = _flags_text(graph)
    elif info is not None:
        preprocessing, where = info.spec.preprocessing, f"model.json ({info.architecture})"
    else:
        where = _default_text()
        log.info("%s: no normalisation given; using %s", path.name, where)
    architecture = info.architecture if info is not None else f"keras model {path.name}"
    return Original(KERAS, path, labels, int(shape[1]), preprocessing, where, architecture,
                    lambda batch: keras_model(batch, training=False).numpy())
