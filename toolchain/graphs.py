"""Frozen TensorFlow for Poets graphs: one image input, one output, and a normalisation that is
never a silent guess.

A ``retrained_graph.pb`` written by retrain.py holds more than image in, probabilities out:

- TF for Poets 2 (MobileNet): image placeholder ``input`` → backbone → retrain.py's
  ``input_1/BottleneckInputPlaceholder`` (a ``PlaceholderWithDefault`` of the bottleneck, so
  training could feed cached bottlenecks) → ``final_training_ops`` → ``final_result``;
- TF for Poets 1 (Inception V3): ``DecodeJpeg/contents`` (JPEG bytes) → DecodeJpeg → Cast →
  ExpandDims → ResizeBilinear (299) → Sub (128) → ``Mul`` (1/128) → backbone → ``pool_3/_reshape``
  → ``input/BottleneckInputPlaceholder`` → ``final_training_ops`` → ``final_result``.

Converters see every ``Placeholder`` and ``PlaceholderWithDefault`` as an input (coremltools:
"Multiple inputs are found in graph"), so :func:`load` cuts the graph at the image input (the
node named there becomes a float32 ``[1, size, size, 3]`` placeholder; for TF for Poets 1 that
is ``Mul``, whose value is already normalised), rewrites every ``PlaceholderWithDefault`` into an
``Identity`` of its default and drops every node the output does not need: the graph a target
converts has exactly one input.

Normalisation (what ``(pixel - mean) / std`` the artifact applies) comes, in this order, from the
``--input-mean``/``--input-std`` flags, from the graph itself (TF for Poets 1's ``Sub``/``Mul``
constants), from retrain.py's defaults for the detected architecture (MobileNet 127.5/127.5,
Inception V3 128/128), and only then is a guess (127.5/127.5), which :attr:`Normalization.guess`
says so the caller warns. The source is kept with the values, so every artifact records it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.backbones import Preprocessing
from toolchain.errors import ModelError, UnsafeModel, first_line
from toolchain.poets import DEFAULT_NORMALIZATION, NORMALIZATION, placeholders_as_identity
from toolchain.untrusted import LIMITS, check_input_side, shown
from toolchain.untrusted import graphs as untrusted_graphs
from toolchain.untrusted.files import read_limited

#: The output retrain.py names (``--final_tensor_name``).
OUTPUT = "final_result"
#: The image inputs tried when no ``--input-name`` is given: TF for Poets 2, then 1.
INPUTS = ("input", "Mul")
#: retrain.py's ``input_mean``/``input_std`` per architecture family (poets.py's table).
RETRAIN_DEFAULTS = NORMALIZATION
#: The mean and std used when nothing tells (retrain.py's MobileNet rows); always warned.
GUESS = DEFAULT_NORMALIZATION
#: Ops that look like inputs to a converter.
INPUT_OPS = ("Placeholder", "PlaceholderWithDefault")
INCEPTION_SIZE = 299


@dataclass(frozen=True)
class Normalization:
    """``input = (pixel - mean) / std``, and where those values came from (``source``)."""

    mean: float
    std: float
    source: str
    guess: bool = False
    #: Set when flags override what the graph itself says (TF for Poets 1's Sub/Mul), so the
    #: caller can warn: the artifact will then compute something else than the graph did.
    conflict: str = ""

    @property
    def preprocessing(self) -> Preprocessing:
        scale = 1.0 / self.std
        return Preprocessing(scale, (-self.mean * scale,) * 3)

    @property
    def line(self) -> str:
        """What ``convert`` and ``label`` print: ``normalisation: mean 128 std 128 (...)``."""
        return f"normalisation: mean {self.mean:g} std {self.std:g} ({self.source})"


@dataclass(frozen=True)
class FrozenGraph:
    """A frozen graph cut to one image input and one output, ready for every target."""

    path: Path
    graph_def: Any = None
    input_name: str = INPUTS[0]
    output_name: str = OUTPUT
    input_size: int = 0
    #: ``mobilenet_v1`` (TF-slim or Keras names), ``inception_v3`` or ``unknown``.
    family: str = "unknown"
    #: e.g. ``mobilenet_v1_0.25_128``, ``inception_v3``, ``unknown``.
    architecture: str = "unknown"
    normalization: Normalization = Normalization(*GUESS, "unset", True)
    #: The other nodes that looked like inputs, each rewritten or pruned away.
    removed_inputs: tuple[str, ...] = ()

    def function_factory(self) -> Callable[[], Any]:
        """A factory of the concrete function ``float32 [1, size, size, 3] → probabilities``
        (``targets.Source.function_factory``): the cut graph imported inside
        ``tf.compat.v1.wrap_function`` and pruned to its input and output. coremltools 9 refuses
        a ``.pb`` path when TensorFlow 2 is installed, but accepts this concrete function."""
        graph_def, feed, fetch = self.graph_def, f"{self.input_name}:0", f"{self.output_name}:0"

        def factory():
            import tensorflow as tf

            wrapped = tf.compat.v1.wrap_function(
                lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
            return wrapped.prune(wrapped.graph.get_tensor_by_name(feed),
                                 wrapped.graph.get_tensor_by_name(fetch))
        return factory


def parse(path: Path):
    """The GraphDef in ``path``, checked as a file from a stranger (``toolchain.untrusted``:
    only an image classifier's ops, constants within the limits); anything else is one
    ModelError."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(read_limited(Path(path), LIMITS.graph_bytes, "frozen graph"))
    except UnsafeModel:
        raise
    # protobuf raises DecodeError (an Exception), or RuntimeWarning-like errors on junk
    except (OSError, Exception) as error:  # noqa: BLE001
        raise ModelError(f"cannot read frozen graph {shown(str(path))}: {first_line(error)}",
                         hint="pass a frozen GraphDef, as retrain.py's --output_graph") from error
    if not graph_def.node:
        raise ModelError(f"cannot read frozen graph {shown(str(path))}: it holds no nodes",
                         hint="pass a frozen GraphDef, as retrain.py's --output_graph")
    untrusted_graphs.check(graph_def, str(path))
    return graph_def


def candidate_inputs(graph_def) -> list[str]:
    """Nodes that may be the image input: placeholders, and TF for Poets 1's ``Mul``."""
    return [node.name for node in graph_def.node
            if node.op in INPUT_OPS or (node.op == "Mul" and node.name == "Mul")]


def load(path: Path, *, input_name: str | None = None, output_name: str | None = None,
         mean: float | None = None, std: float | None = None) -> FrozenGraph:
    """Read ``path``, find its image input and output by name, detect the architecture, decide
    the normalisation, and cut the graph to that one input (see the module docstring)."""
    path = Path(path)
    graph_def = parse(path)
    nodes = {node.name: node for node in graph_def.node}
    output_name = output_name or OUTPUT
    if output_name not in nodes:
        raise ModelError(f"{path.name} has no tensor named {output_name!r}",
                         hint="pass --output-name (retrain.py's default is final_result)")
    input_name = _input_name(path, nodes, graph_def, input_name)
    own = _own_backbone(graph_def)
    if own is not None:  # written by ``toolchain retrain --output_graph``
        family, alpha = own.family, None
        pre = own.preprocessing
        known = Normalization(pre.mean[0], pre.std[0],
                              f"the toolchain's {own.name} backbone preprocessing")
    else:
        family, alpha = _family(graph_def, nodes, nodes[input_name])
        known = None
    size = _input_size(path, nodes, nodes[input_name], family)
    architecture = own.name if own is not None else family
    if own is None and family == "mobilenet_v1" and alpha is not None:
        architecture = f"mobilenet_v1_{alpha:g}{'.0' if alpha == int(alpha) else ''}_{size}"
    normalization = _normalization(nodes, nodes[input_name], family, mean, std, known)
    cut, removed = _cut(path, graph_def, input_name, output_name, size)
    return FrozenGraph(path=path, graph_def=cut, input_name=input_name, output_name=output_name,
                       input_size=size, family=family, architecture=architecture,
                       normalization=normalization, removed_inputs=removed)


def _input_name(path: Path, nodes: dict, graph_def, given: str | None) -> str:
    candidates = ", ".join(candidate_inputs(graph_def)) or "none"
    if given is not None:
        if given not in nodes:
            raise ModelError(f"{path.name} has no tensor named {given!r}",
                             hint=f"candidate inputs: {candidates}")
        return given
    for name in INPUTS:
        if name in nodes:
            return name
    raise ModelError(f"{path.name} has neither 'input' (TF for Poets 2) nor 'Mul' (TF for "
                     "Poets 1)", hint=f"pass --input-name; candidate inputs: {candidates}")


def _shape(node) -> list[int] | None:
    """The placeholder's declared shape (-1 for unknown sizes), None when undeclared."""
    if "shape" not in node.attr or node.attr["shape"].shape.unknown_rank:
        return None
    return [dim.size for dim in node.attr["shape"].shape.dim]


def _const(nodes: dict, name: str):
    """The NumPy value of the Const behind ``name`` (through Identity nodes), else None."""
    import tensorflow as tf

    node = nodes.get(name.split(":")[0].lstrip("^"))
    while node is not None and node.op in ("Identity", "ReadVariableOp") and node.input:
        node = nodes.get(node.input[0].split(":")[0])
    if node is None or node.op != "Const":
        return None
    return tf.make_ndarray(node.attr["value"].tensor)


def _family(graph_def, nodes: dict, image) -> tuple[str, float | None]:
    """The architecture family from node names, and MobileNet's width multiplier (the first
    convolution's depth over 32)."""
    names = [node.name for node in graph_def.node]
    if any(name.startswith("MobilenetV1/") or "conv_dw_1" in name for name in names):
        first = next((node for node in graph_def.node
                      if node.op == "Conv2D" and len(node.input) > 1), None)
        # only the first convolution tells (a quantized graph's goes through FakeQuant: None)
        weights = _const(nodes, first.input[1]) if first is not None else None
        if weights is not None and weights.ndim == 4:
            return "mobilenet_v1", round(float(weights.shape[3]) / 32, 4)
        return "mobilenet_v1", None
    if (image.op == "Mul" and image.name == "Mul") or any(
            name.startswith(("mixed_10/", "pool_3")) for name in names):
        return "inception_v3", None
    return "unknown", None


def _resize_size(nodes: dict, image) -> int | None:
    """TF for Poets 1: the ResizeBilinear size constant upstream of ``Mul`` (through ``Sub``)."""
    node, steps = image, 0
    while node is not None and steps < 4:
        if node.op in ("ResizeBilinear", "ResizeBicubic", "ResizeNearestNeighbor"):
            size = _const(nodes, node.input[1])
            if size is not None and size.shape == (2,) and size[0] == size[1]:
                return int(size[0])
            return None
        node, steps = nodes.get(node.input[0].split(":")[0]) if node.input else None, steps + 1
    return None


def _input_size(path: Path, nodes: dict, image, family: str) -> int:
    """The square image size: the placeholder's shape, else the resize before it, else the
    architecture's; and the input must be float32 pixels, [1, size, size, 3]."""
    dtype = image.attr["dtype"].type if "dtype" in image.attr else (
        image.attr["T"].type if "T" in image.attr else 1)
    if dtype != 1:  # DT_FLOAT
        import tensorflow as tf

        raise ModelError(f"input {image.name!r} of {path.name} takes "
                         f"{tf.dtypes.as_dtype(dtype).name}, not float32 pixels",
                         hint="pass --input-name with the image input (TF for Poets 1: Mul)")
    shape = _shape(image)
    if shape is not None:
        if len(shape) != 4 or shape[1] != shape[2] or shape[1] <= 0 or shape[3] != 3 \
                or shape[0] not in (1, -1):
            raise ModelError(f"input {image.name!r} of {path.name} has shape {shape}; an image "
                             "input is [1, size, size, 3]",
                             hint="pass --input-name with the image input")
        return check_input_side(shape[1], str(path))
    size = _resize_size(nodes, image)
    if size is None and family == "inception_v3" and image.name == "Mul":
        size = INCEPTION_SIZE
    if size is None:
        raise ModelError(f"cannot tell the image size of input {image.name!r} in {path.name}: "
                         "it declares no shape and no resize precedes it",
                         hint="pass --input-name with a placeholder of shape [1, size, size, 3]")
    return check_input_side(size, str(path))


def _own_backbone(graph_def):
    """The backbone spec of a graph the toolchain wrote (its nodes are under
    ``retrained_<architecture>/``), else None."""
    from toolchain.backbones import get
    from toolchain.errors import UnknownArchitecture

    for node in graph_def.node:
        head = node.name.split("/")[0]
        if head.startswith("retrained_") and "/" in node.name:
            try:
                spec = get(head[len("retrained_"):])
            except UnknownArchitecture:
                return None
            pre = spec.preprocessing
            return spec if len(set(pre.mean)) == 1 else None
    return None


def _normalization(nodes: dict, image, family: str, mean: float | None,
                   std: float | None, known: Normalization | None = None) -> Normalization:
    found = _sub_mul(nodes, image)
    if known is not None:
        detected = known
    elif found is not None:
        detected = Normalization(*found, "read from the graph's Sub/Mul nodes")
    elif family in RETRAIN_DEFAULTS:
        detected = Normalization(*RETRAIN_DEFAULTS[family], f"retrain.py's defaults for {family}")
    else:
        detected = Normalization(*GUESS, "a guess: the architecture is unknown", guess=True)
    if mean is None and std is None:
        return detected
    if mean is not None and std is not None:
        chosen = Normalization(float(mean), float(std), "flag")
    elif mean is not None:
        chosen = Normalization(float(mean), detected.std, f"--input-mean flag; std "
                               f"{detected.source}", detected.guess)
    else:
        chosen = Normalization(detected.mean, float(std), f"--input-std flag; mean "
                               f"{detected.source}", detected.guess)
    if found is not None and (chosen.mean, chosen.std) != found:
        chosen = Normalization(chosen.mean, chosen.std, chosen.source, chosen.guess,
                               f"the graph's Sub/Mul nodes say mean {found[0]:g} std "
                               f"{found[1]:g}")
    return chosen


def _sub_mul(nodes: dict, image) -> tuple[float, float] | None:
    """TF for Poets 1's ``Mul(Sub(pixels, mean), 1/std)``: (mean, std), else None."""
    if image.op != "Mul" or len(image.input) != 2:
        return None
    scale = _const(nodes, image.input[1])
    sub = nodes.get(image.input[0].split(":")[0])
    if scale is None or scale.size != 1 or not float(scale) > 0 or sub is None \
            or sub.op != "Sub" or len(sub.input) != 2:
        return None
    mean = _const(nodes, sub.input[1])
    if mean is None or mean.size != 1:
        return None
    return float(mean), round(1.0 / float(scale), 6)


def _cut(path: Path, graph_def, input_name: str, output_name: str, size: int):
    """(the graph with one float32 image placeholder at ``input_name``, every
    PlaceholderWithDefault an Identity of its default, nothing the output does not need;
    the names of the other would-be inputs)."""
    import tensorflow as tf

    rewritten = tf.compat.v1.GraphDef()
    rewritten.versions.CopyFrom(graph_def.versions)
    rewritten.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        new = rewritten.node.add()
        if node.name == input_name:
            new.name, new.op = input_name, "Placeholder"
            new.attr["dtype"].type = tf.float32.as_datatype_enum
            new.attr["shape"].shape.CopyFrom(
                tf.TensorShape([1, size, size, 3]).as_proto())
        else:
            new.CopyFrom(node)
    rewritten = placeholders_as_identity(rewritten)
    cut = tf.compat.v1.graph_util.extract_sub_graph(rewritten, [output_name])
    kept = {node.name: node for node in cut.node}
    if input_name not in kept:
        raise ModelError(f"{output_name!r} of {path.name} does not depend on input "
                         f"{input_name!r}", hint="pass --input-name with the image input")
    others = sorted(name for name, node in kept.items()
                    if node.op == "Placeholder" and name != input_name)
    if others:
        raise ModelError(f"{output_name!r} of {path.name} needs other inputs than "
                         f"{input_name!r}: {', '.join(others)}",
                         hint="pass --input-name with the image input")
    try:  # an input of the wrong shape for what follows it fails here, not in a converter
        with tf.Graph().as_default() as graph:
            tf.compat.v1.import_graph_def(cut, name="")
    except (ValueError, TypeError) as error:
        raise ModelError(f"{input_name!r} of {path.name} cannot take a [1, {size}, {size}, 3] "
                         f"image: {first_line(error)}",
                         hint="pass --input-name with the image input") from error
    untrusted_graphs.check_shapes(graph, str(path))
    removed = tuple(name for name in candidate_inputs(graph_def)
                    if name != input_name and (name not in kept or kept[name].op == "Identity"))
    return cut, removed
