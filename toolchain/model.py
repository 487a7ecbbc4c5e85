"""The retrained model on disk: what ``retrain`` writes and every later stage reads.

A retrain output directory holds:

- ``model.keras``: one graph, backbone and new head, preprocessed image in, probabilities out;
  loaded with Keras' ``safe_mode`` so a data file can never run code;
  or, when the backbone is a frozen graph (``--weights`` a ``.pb``/``.tgz`` or ``poets``),
  ``retrained_graph.pb`` as retrain.py wrote it: the backbone graph, its bottleneck through
  ``BottleneckInputPlaceholder``, ``final_training_ops`` and the softmax ``final_result``;
  the manifest's ``backbone`` then records the graph's file, digest, tensors and normalisation;
- ``labels.txt``: one label per line, UTF-8, in output order;
- ``model.json``: the manifest (architecture, preprocessing, labels, weights, accuracy, split),
  written last, so a directory with a manifest always holds a complete model;
- ``split.json``: which image went to which set, and every skipped file with its reason.

:func:`predictor` (the original's probabilities on preprocessed pixels) is how later stages run
either kind. The manifest names the backbone; its preprocessing is re-derived from the registry
(for a frozen graph, from the recorded normalisation) and compared with the recorded one, so a
conversion can never use other preprocessing than training did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from toolchain import atomic, backbones
from toolchain.dataset import SUBSETS, labels_text
from toolchain.errors import ModelError, ToolchainError, first_line
from toolchain.untrusted import LIMITS
from toolchain.untrusted.files import keras_format, read_json, relative_inside

MANIFEST = "model.json"
KERAS_FILE = "model.keras"
GRAPH_FILE = "retrained_graph.pb"
#: The retrained graph's probabilities tensor (retrain.py's ``--final_tensor_name``).
GRAPH_OUTPUT = "final_result"
LABELS_FILE = "labels.txt"
SPLIT_FILE = "split.json"
FORMAT = "toolchain-retrained-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    """The manifest of a retrained model."""

    architecture: str
    labels: tuple[str, ...]
    weights: str
    weights_fingerprint: str
    bottleneck_size: int
    test_accuracy: float | None
    validation_accuracy: float | None
    test_images: int
    training_steps: int
    toolchain_version: str
    #: None for a Keras backbone; for a frozen graph, ``poets.GraphSource.record()`` plus
    #: ``input_size``: the graph the model was built on and how its input is fed.
    backbone: dict | None = None

    @property
    def is_graph(self) -> bool:
        return bool(self.backbone) and self.backbone.get("kind") == "frozen_graph"

    @property
    def spec(self) -> backbones.BackboneSpec:
        if self.is_graph:
            scale = 1.0 / self.backbone["input_std"]
            return backbones.BackboneSpec(
                self.architecture, "frozen_graph", 1.0, int(self.backbone["input_size"]),
                backbones.Preprocessing(scale, (-self.backbone["input_mean"] * scale,) * 3))
        return backbones.get(self.architecture)

    def record(self) -> dict:
        spec = self.spec
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        data["labels"] = list(self.labels)
        if self.backbone is None:
            del data["backbone"]  # a Keras backbone: the manifest as before
        data["input"] = {"size": spec.input_size, "shape": [1, *spec.input_shape],
                         "preprocessing": spec.preprocessing.record()}
        data["output"] = {"name": "probabilities", "classes": len(self.labels)}
        return data


def find_dir(path: Path) -> Path:
    """The retrain output directory for ``--model``: the folder itself, or a build's ``model/``."""
    path = Path(path)
    if path.is_file() and path.name in (MANIFEST, KERAS_FILE):
        path = path.parent
    for candidate in (path, path / "model"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise ModelError(f"{path} holds no retrained model (no {MANIFEST})",
                     hint="pass the --output-dir of `toolchain retrain` or `toolchain build`")


def load_info(path: Path) -> ModelInfo:
    """Read and check the manifest of the model at ``path``."""
    folder = find_dir(path)
    try:
        data = read_json(folder / MANIFEST)
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError among them
        raise ModelError(f"cannot read {folder / MANIFEST}: {first_line(error)}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{folder / MANIFEST} is not a toolchain model manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{folder / MANIFEST} has format version {data.get('format_version')}; "
                         f"this toolchain reads version {FORMAT_VERSION}",
                         hint="retrain with this version of the toolchain")
    fields = ModelInfo.__dataclass_fields__
    try:
        info = ModelInfo(**{name: data[name] for name in fields if name != "backbone"},
                         backbone=data.get("backbone"))
    except KeyError as error:
        raise ModelError(f"{folder / MANIFEST} lacks the field {error}") from error
    info = ModelInfo(**{**asdict(info), "labels": tuple(info.labels)})
    recorded = data.get("input", {}).get("preprocessing", {})
    expected = info.spec.preprocessing.record()
    if recorded != json.loads(json.dumps(expected)):
        raise ModelError(f"{folder / MANIFEST} records preprocessing {recorded} but "
                         f"{info.architecture} uses {expected}",
                         hint="the model was written by another toolchain version; retrain it")
    return info


@dataclass(frozen=True)
class Split:
    """``split.json`` as later stages read it: the percentages that recompute the held-out set
    (:mod:`toolchain.heldout`), and the image folder and each set's images, relative paths
    inside it (the calibration and tuning images of :mod:`toolchain.conversion`)."""

    validation_percentage: float
    testing_percentage: float
    image_dir: Path | None
    sets: dict[str, tuple[str, ...]]

    def images(self, name: str, image_dir: Path | None = None) -> tuple[Path, ...]:
        """The images of set ``name`` that exist under ``image_dir`` (default: the recorded
        folder; none when neither is known)."""
        root = Path(image_dir) if image_dir else self.image_dir
        if root is None:
            return ()
        return tuple(root / rel for rel in self.sets[name] if (root / rel).is_file())


def read_split(folder: Path) -> Split:
    """The ``split.json`` of a model folder, read as a file from a stranger: a ModelError
    naming the file and what is wrong with it. Every image a set names must be a relative path
    that stays inside the image folder, so a record listing ``/home/me/.ssh/id_rsa`` or
    ``../../secret.jpg`` cannot send a conversion outside it. The recorded ``image_dir`` itself
    is the folder the model says it was trained on: for a stranger's model folder, pass the
    images with ``--image-dir`` rather than trust it."""
    path = folder / SPLIT_FILE
    try:
        record = read_json(path, LIMITS.split_bytes)
        if not isinstance(record, dict) or not isinstance(record.get("sets"), dict):
            raise ValueError("not a split record (no sets)")
        sets = {}
        for name in SUBSETS:
            if not isinstance(record["sets"].get(name), list):
                raise ValueError(f"its {name} set is not a list")
            sets[name] = tuple(record["sets"][name])
        image_dir = record.get("image_dir")
        split = Split(float(record["validation_percentage"]),
                      float(record["testing_percentage"]),
                      None if image_dir is None else Path(str(image_dir)), sets)
    except KeyError as error:
        raise ModelError(f"cannot read the split of {path}: it has no {error.args[0]}") from error
    except (OSError, TypeError, ValueError) as error:
        raise ModelError(f"cannot read the split of {path}: {first_line(error)}") from error
    for name, entries in sets.items():
        for entry in entries:
            if not relative_inside(entry):
                raise ModelError(f"{path} lists {entry!r} in its {name} set: not a path "
                                 f"inside the image folder")
    return split


def load_keras(path: Path):
    """Load the retrained Keras model (``safe_mode``: no code from the file is executed)."""
    import tensorflow as tf

    folder = find_dir(path)
    try:
        keras_format(folder / KERAS_FILE)  # an HDF5 file would load without safe mode
        return tf.keras.models.load_model(folder / KERAS_FILE, compile=False, safe_mode=True)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"cannot load {folder / KERAS_FILE}: {first_line(error, 200)}") from error


def save(folder: Path, keras_model, info: ModelInfo, split_record: dict) -> None:
    """Write a model directory; each file atomically and the manifest last.

    ``keras_model`` is a Keras model, or the bytes of the retrained GraphDef for a model on a
    frozen-graph backbone."""
    folder = Path(folder)
    atomic.sweep(folder)
    try:
        # An earlier model's manifest goes first: were this run killed between two files, the
        # folder must not pair the old manifest with the new weights.
        (folder / MANIFEST).unlink(missing_ok=True)
    except OSError as error:
        raise ModelError(f"cannot replace the model in {folder}: {error.strerror}",
                         hint="pass a writable --output-dir") from error
    if isinstance(keras_model, bytes):
        _unlink(folder / KERAS_FILE)
        atomic.write_bytes(folder / GRAPH_FILE, keras_model)
    else:
        _unlink(folder / GRAPH_FILE)
        with atomic.replacing(folder / KERAS_FILE, suffix=".keras") as tmp:
            keras_model.save(tmp, save_format="keras_v3")
    atomic.write_text(folder / LABELS_FILE, labels_text(info.labels))
    atomic.write_json(folder / SPLIT_FILE, split_record)
    atomic.write_json(folder / MANIFEST, info.record())


def _unlink(path: Path) -> None:
    """The other kind's model file goes: a folder never holds two models."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise ModelError(f"cannot replace the model in {path.parent}: {error.strerror}",
                         hint="pass a writable --output-dir") from error


def load_graph_def(folder: Path, info: ModelInfo):
    """The retrained GraphDef of a graph-backed model folder."""
    from toolchain import poets

    path = find_dir(folder) / GRAPH_FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror}") from error
    try:
        return poets.parse_graph(data, str(path))
    except ToolchainError as error:
        raise ModelError(error.message) from error


def predictor(path: Path):
    """``(info, predict)``: the original's probabilities, ``predict(preprocessed batch)`` → NumPy
    ``(n, classes)``, for either kind of model folder (Keras, or retrained frozen graph)."""
    folder = find_dir(path)
    info = load_info(folder)
    if info.is_graph:
        from toolchain import poets

        features = poets.GraphFeatures(load_graph_def(folder, info),
                                       info.backbone["input_tensor"], GRAPH_OUTPUT,
                                       info.spec.input_size)
        return info, lambda batch: features(batch).numpy()
    keras_model = load_keras(folder)
    return info, lambda batch: keras_model(batch, training=False).numpy()


def graph_function_factory(folder: Path, info: ModelInfo):
    """For conversion: a factory of the retrained graph's concrete function, batch 1,
    preprocessed image → ``final_result``."""
    from toolchain import poets

    graph_def = poets.placeholders_as_identity(load_graph_def(folder, info))
    input_tensor = info.backbone["input_tensor"]
    return lambda: poets.graph_function(graph_def, input_tensor, GRAPH_OUTPUT, 1)


def frozen_graph_bytes(keras_model, input_name: str = "input",
                       output_name: str = "final_result") -> bytes:
    """The model as a frozen TensorFlow GraphDef with retrain.py's tensor names.

    TensorFlow for Poets tools (``label_image``, older converters) expect a frozen graph with a
    float ``input`` placeholder of preprocessed pixels and a softmax ``final_result``.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    shape = [1, *keras_model.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=input_name)])
    def serve(image):
        return tf.identity(keras_model(image, training=False), name=output_name)

    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    graph_def = frozen.graph.as_graph_def()
    names = {node.name for node in graph_def.node}
    if input_name not in names or output_name not in names:
        raise ModelError(f"frozen graph lacks the tensors {input_name!r} and {output_name!r}")
    return graph_def.SerializeToString()
