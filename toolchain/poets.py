"""Frozen-graph backbones: the graphs TensorFlow for Poets' retrain.py downloads, or any like them.

retrain.py retrained the last layer on a frozen ImageNet GraphDef: for MobileNet v1 the file
``mobilenet_v1_<version>_<size>/frozen_graph.pb`` (``quantized_graph.pb`` for the
``_quantized`` architectures) inside ``mobilenet_v1_<version>_<size>_frozen.tgz``, for Inception
V3 ``classify_image_graph_def.pb`` inside ``inception-2015-12-05.tgz``. :func:`poets_model` is its
``create_model_info`` (URL, file, input and bottleneck tensors, normalisation) so that
``--weights`` with one of those files, or ``--weights poets``, computes the same bottlenecks
retrain.py computed. Any other ``.pb`` works when its tensors are named by flag.

:class:`GraphFeatures` runs the graph from its input tensor to its bottleneck tensor (a batch
at a time when the graph allows it, else image by image); it offers what the bottleneck cache
and its engines use of a Keras backbone (``input_shape``, ``output_shape``, a call on batches of
preprocessed images). :func:`append_head` writes the retrained model as retrain.py wrote it:
the backbone graph, ``input/BottleneckInputPlaceholder`` (``input_1/...`` when the graph has an
``input`` node), ``final_training_ops/...`` and ``final_result``.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.errors import ModelError, UsageError, WeightsUnavailable, first_line
from toolchain.untrusted import LIMITS, check_input_side, files, shown
from toolchain.untrusted import graphs as untrusted_graphs

#: Where retrain.py downloaded its graphs from; a module attribute so tests point it at a
#: local ``file://`` folder and run the very code that downloads.
POETS_BASE = "http://download.tensorflow.org/models/"
_MOBILENET_VERSIONS = ("1.0", "0.75", "0.50", "0.25")
_MOBILENET_SIZES = (224, 192, 160, 128)


@dataclass(frozen=True)
class PoetsModel:
    """One row of retrain.py's ``create_model_info`` (tensor names without ``:0``)."""

    architecture: str
    filename: str
    url_path: str
    member: str
    input_tensor: str
    bottleneck_tensor: str
    bottleneck_size: int
    input_size: int
    input_mean: float
    input_std: float

    @property
    def url(self) -> str:
        return POETS_BASE + self.url_path


@dataclass(frozen=True)
class GraphSource:
    """Where a frozen-graph backbone came from, and how it is fed: recorded in model.json."""

    path: str
    member: str | None
    sha256: str
    input_tensor: str
    bottleneck_tensor: str
    input_mean: float
    input_std: float
    graph_def: object = field(default=None, compare=False, repr=False)

    def record(self) -> dict:
        return {"kind": "frozen_graph", "file": self.path, "member": self.member,
                "sha256": self.sha256, "input_tensor": self.input_tensor,
                "bottleneck_tensor": self.bottleneck_tensor, "input_mean": self.input_mean,
                "input_std": self.input_std}


#: retrain.py's ``input_mean``/``input_std`` per architecture family (its ``create_model_info``):
#: the one table every reader of a frozen graph or retrained model takes its defaults from.
NORMALIZATION = {"mobilenet_v1": (127.5, 127.5), "inception_v3": (128.0, 128.0)}
#: What retrain.py's MobileNet rows use, and so the default where nothing else tells.
DEFAULT_NORMALIZATION = NORMALIZATION["mobilenet_v1"]


def poets_model(architecture: str) -> PoetsModel | None:
    """retrain.py's row for ``mobilenet_0.50_224[_quantized]``, ``inception_v3``, ..."""
    text = architecture.strip().lower()
    if text == "inception_v3":
        name = "inception-2015-12-05.tgz"
        return PoetsModel(text, name, "image/imagenet/" + name, "classify_image_graph_def.pb",
                          "Mul", "pool_3/_reshape", 2048, 299, *NORMALIZATION["inception_v3"])
    match = re.fullmatch(r"mobilenet_(\d\.\d+)_(\d+)(_quantized)?", text)
    if not match or match.group(1) not in (*_MOBILENET_VERSIONS, "0.5") \
            or int(match.group(2)) not in _MOBILENET_SIZES:
        return None
    version, size, quantized = match.groups()
    version = "0.50" if version == "0.5" else version
    folder = f"mobilenet_v1_{version}_{size}"
    member = f"{folder}/{'quantized_graph.pb' if quantized else 'frozen_graph.pb'}"
    archive = f"{folder}_frozen.tgz"
    return PoetsModel(f"mobilenet_{version}_{size}{quantized or ''}", archive, archive, member,
                      "input", "MobilenetV1/Predictions/Reshape", 1001, int(size),
                      *NORMALIZATION["mobilenet_v1"])


def poets_hint() -> str:
    return ("retrain.py's architectures: mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>"
            "[_quantized] or inception_v3")


def model_for_file(path: Path, quantized: bool = False) -> PoetsModel | None:
    """The row a file retrain.py downloads or extracts belongs to, from its name alone."""
    name = Path(path).name
    if name in ("inception-2015-12-05.tgz", "classify_image_graph_def.pb"):
        return poets_model("inception_v3")
    match = re.fullmatch(r"mobilenet_v1_(\d\.\d+)_(\d+)_frozen\.tgz", name)
    if match:
        suffix = "_quantized" if quantized else ""
        return poets_model(f"mobilenet_{match.group(1)}_{match.group(2)}{suffix}")
    return None


def read_graph_bytes(path: Path, member: str | None = None) -> tuple[bytes, str | None]:
    """The GraphDef bytes of a ``.pb``, or of ``member`` (else the only ``.pb``) of a ``.tgz``."""
    path = Path(path)
    if not path.name.endswith((".tgz", ".tar.gz")):
        try:
            return files.read_limited(path, LIMITS.graph_bytes, "frozen graph"), None
        except OSError as error:
            raise WeightsUnavailable(f"cannot read frozen graph {shown(str(path))}: "
                                     f"{error.strerror}") from error
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {m.name: m for m in files.tar_members(archive, path)}
            graphs = [name for name in members if name.endswith(".pb")]
            chosen = member if member is not None else (graphs[0] if len(graphs) == 1 else None)
            if chosen not in graphs:
                wanted = shown(member) if member else "exactly one .pb"
                raise WeightsUnavailable(
                    f"{shown(path.name)} holds no {wanted} (its graphs: "
                    f"{', '.join(map(shown, graphs)) or 'none'})",
                    hint="pass the archive retrain.py downloads, or the .pb itself")
            files.check_member(path, members[chosen], LIMITS.graph_bytes)
            return archive.extractfile(members[chosen]).read(), chosen
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        raise WeightsUnavailable(f"cannot read {path}: {first_line(error, 120)}",
                                 hint="the archive is damaged; fetch it again") from error


def parse_graph(data: bytes, where: str):
    """A ``GraphDef`` from bytes; anything unparsable is one WeightsUnavailable."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as error:  # noqa: BLE001 (protobuf's DecodeError is a bare Exception)
        raise WeightsUnavailable(f"{shown(where)} is not a TensorFlow GraphDef "
                                 f"({first_line(error, 80)})") from error
    if not graph_def.node:
        raise WeightsUnavailable(f"{shown(where)} is not a TensorFlow GraphDef (no nodes)")
    untrusted_graphs.check(graph_def, where)
    return graph_def


def detect(graph_def) -> PoetsModel | None:
    """retrain.py's row whose tensor names this graph has (MobileNet v1 or Inception V3)."""
    names = {node.name for node in graph_def.node}
    if {"input", "MobilenetV1/Predictions/Reshape"} <= names:
        return poets_model("mobilenet_1.0_224")
    if {"Mul", "pool_3/_reshape"} <= names:
        return poets_model("inception_v3")
    return None


def tensor_shape(graph_def, name: str, where: str) -> list[int | None]:
    """The static shape of op ``name``'s output 0; a missing name lists candidates."""
    import tensorflow as tf

    check_names(graph_def, where, name)
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        untrusted_graphs.check_shapes(graph, where)
        tensor = graph.get_tensor_by_name(f"{name}:0")
        if tensor.shape.rank is None:
            return []
        if tensor.dtype != tf.float32:
            return [f"dtype {tensor.dtype.name}"]
        return list(tensor.shape.as_list())


def candidates(graph_def, limit: int = 8) -> str:
    """The last ops of the graph before any softmax: where a bottleneck usually is."""
    skip = ("Const", "Identity", "NoOp", "Placeholder")
    names = [node.name for node in graph_def.node if node.op not in skip]
    ends = [n for n in names if re.search(r"(reshape|pool|squeeze|avgpool|mean|flatten)", n, re.I)]
    chosen = (ends or names)[-limit:]
    return ", ".join(chosen) or "none"


def image_size(shape: list, name: str, where: str) -> int:
    """The square size of an image tensor ``[n, size, size, 3]``; anything else is refused."""
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[1] != shape[2] \
            or shape[0] not in (None, 1):
        raise ModelError(f"tensor {name!r} of {where} has shape {shape}, not an image "
                         "[1 or ?, size, size, 3] of float32",
                         hint="pass --input-tensor with the graph's image input")
    return check_input_side(int(shape[1]), where)


def graph_function(graph_def, input_tensor: str, output_tensor: str, batch: int | None):
    """A concrete function ``[batch, size, size, 3]`` float32 → ``output_tensor``, pruned.

    The input is mapped onto ``input_tensor`` (``input_map``), so it may be a placeholder
    (``input``) or an intermediate tensor (Inception's ``Mul``, after its JPEG decoding), and
    its batch dimension is ours, not the graph's. Pruning drops everything the output does not
    need (the JPEG decoding, the ImageNet softmax).
    """
    import tensorflow as tf

    shape = tensor_shape(graph_def, input_tensor, "the graph")
    spec = tf.TensorSpec([batch, *shape[1:]], tf.float32, name="image")

    def body(image):
        (output,) = tf.compat.v1.import_graph_def(
            graph_def, input_map={f"{input_tensor}:0": image},
            return_elements=[f"{output_tensor}:0"], name="")
        return output

    wrapped = tf.compat.v1.wrap_function(body, [spec])
    return wrapped.prune(wrapped.inputs[0], wrapped.outputs[0])


class GraphFeatures:
    """The frozen graph as the feature extractor of a backbone: preprocessed images → vectors."""

    def __init__(self, graph_def, input_tensor: str, bottleneck_tensor: str, size: int) -> None:
        import tensorflow as tf

        self.input_shape = (None, size, size, 3)
        self.batched = True
        self._function = graph_function(graph_def, input_tensor, bottleneck_tensor, None)
        probe = np.zeros((2, size, size, 3), np.float32)
        try:
            out = self._function(tf.constant(probe)).numpy()
            self.batched = out.shape[0] == 2
        except (tf.errors.OpError, ValueError):
            self.batched = False  # e.g. Inception's pool_3/_reshape to a fixed [1, 2048]
        if not self.batched:
            self._function = graph_function(graph_def, input_tensor, bottleneck_tensor, 1)
            out = self._function(tf.constant(probe[:1])).numpy()
        if out.ndim != 2:
            out = out.reshape(out.shape[0], -1)
        self.output_shape = (None, int(out.shape[1]))

    def __call__(self, images, training: bool = False):
        """Vectors ``(n, size)`` of preprocessed images ``(n, size, size, 3)``, as a tensor."""
        import tensorflow as tf

        images = tf.convert_to_tensor(images, tf.float32)
        if self.batched:
            out = self._function(images)
        else:
            out = tf.map_fn(lambda image: tf.reshape(self._function(image[None]), [-1]), images,
                            fn_output_signature=tf.TensorSpec([self.output_shape[1]], tf.float32))
        return tf.reshape(out, [-1, self.output_shape[1]])


def placeholders_as_identity(graph_def):
    """A copy whose ``PlaceholderWithDefault`` nodes are ``Identity`` of their default.

    retrain.py's ``BottleneckInputPlaceholder`` is one; converters treat it as a second input.
    Used for retrained graphs on graph backbones (``toolchain.model``) and for every frozen
    graph converted (``toolchain.graphs``).
    """
    import tensorflow as tf

    copy = tf.compat.v1.GraphDef()
    copy.CopyFrom(graph_def)
    for node in copy.node:
        if node.op == "PlaceholderWithDefault":
            dtype = node.attr["dtype"].type
            node.op = "Identity"
            node.attr.clear()
            node.attr["T"].type = dtype
    return copy


def append_head(graph_def, bottleneck_tensor: str, weights: np.ndarray, biases: np.ndarray,
                output_name: str = "final_result"):
    """The backbone graph plus retrain.py's trained layer: bottleneck → softmax ``final_result``.

    The names are retrain.py's after ``convert_variables_to_constants``: a PlaceholderWithDefault
    ``input/BottleneckInputPlaceholder`` over the bottleneck, ``final_training_ops/weights/
    final_weights`` and ``.../biases/final_biases`` constants, ``final_training_ops/Wx_plus_b/``
    ``MatMul`` and ``add``, then ``final_result``.

    The backbone is first cut to what the bottleneck needs: a graph retrain.py (or this
    toolchain) already retrained carries a head of its own, ``final_result`` included, and
    without the cut the new head would be renamed ``final_result_1`` beside the old one.
    """
    import tensorflow as tf

    backbone = tf.compat.v1.graph_util.extract_sub_graph(graph_def, [bottleneck_tensor])
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(backbone, name="")
        bottleneck = graph.get_tensor_by_name(f"{bottleneck_tensor}:0")
        with tf.name_scope("input"):
            flat = tf.reshape(bottleneck, [-1, weights.shape[0]]) if bottleneck.shape.rank != 2 \
                else bottleneck
            placeholder = tf.compat.v1.placeholder_with_default(
                flat, shape=[None, weights.shape[0]], name="BottleneckInputPlaceholder")
        with tf.name_scope("final_training_ops"):
            with tf.name_scope("weights"):
                kernel = tf.constant(weights.astype(np.float32), name="final_weights")
            with tf.name_scope("biases"):
                bias = tf.constant(biases.astype(np.float32), name="final_biases")
            with tf.name_scope("Wx_plus_b"):
                logits = tf.matmul(placeholder, kernel) + bias
        tf.nn.softmax(logits, name=output_name)
    return graph.as_graph_def()


def fetch(model: PoetsModel, cache_dir: Path) -> Path:
    """The archive retrain.py would download for ``model``: from ``cache_dir``, else downloaded
    into it by Keras' ``get_file`` (the function ``--weights imagenet`` downloads with)."""
    import tensorflow as tf

    try:
        return Path(tf.keras.utils.get_file(model.filename, model.url,
                                            cache_subdir=str(cache_dir)))
    except Exception as error:  # noqa: BLE001 (Keras raises bare Exception on fetch failures)
        raise WeightsUnavailable(
            f"{model.filename} is not in {cache_dir} and cannot be downloaded "
            f"({first_line(error, 120)})",
            hint=f"place {model.filename} in {cache_dir} (from {model.url}), or pass "
                 "--weights PATH") from error


def check_names(graph_def, where: str, *tensors: str) -> None:
    """Every named tensor exists; a missing one is one line listing candidates."""
    names = {node.name for node in graph_def.node}
    for name in tensors:
        if name not in names:
            raise UsageError(f"{where} has no tensor {name!r} (candidates: "
                             f"{candidates(graph_def)})",
                             hint="pass --bottleneck-tensor / --input-tensor with its name")
