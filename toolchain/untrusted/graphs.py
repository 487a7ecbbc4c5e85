"""Frozen graphs from strangers: only the ops an image classifier is made of, constants no
larger than they say and no larger than :data:`~toolchain.untrusted.LIMITS` allow, and static
shapes that fit in memory. Checked on the parsed GraphDef, before it is imported or run.

Why an allow-list: TensorFlow runs every op a graph holds, and its op set includes file I/O
(``ReadFile``, ``WriteFile``, ``Save``, ``MatchingFiles``), Python callbacks (``PyFunc``,
``EagerPyFunc``), queues and readers, ``Print`` and string formatting, and calls into function
libraries. A deny-list would miss the next one. :data:`ALLOWED_OPS` lists the ops of

- the graphs the toolchain writes for every architecture it supports (Keras MobileNet v1, v2,
  v3 small and large, Inception V3, frozen with ``convert_variables_to_constants_v2``: measured,
  ``tests/toolchain/test_untrusted_graphs.py`` keeps it so) and retrain.py's head on them;
- retrain.py's graphs: TF-slim MobileNet v1 (float and quantized: ``FakeQuant*``, an unfused
  batch normalisation) and Inception V3's ``classify_image_graph_def.pb`` (``DecodeJpeg`` →
  ``Cast`` → ``ExpandDims`` → ``ResizeBilinear`` → ``Sub``/``Mul``, ``Concat``,
  ``BatchNormWithGlobalNormalization``), whose JPEG decoding is cut away before anything runs;
- other pure arithmetic an image classifier may use (activations, reductions, shape ops).

No op with a side effect, state, a file, a string beyond JPEG/PNG decoding, or a call into a
function library is on it; a graph with a function library is refused whole.
"""

from __future__ import annotations

from toolchain.errors import UnsafeModel
from toolchain.untrusted import LIMITS, shown, size_text

#: The ops a frozen image classifier may hold (see the module docstring).
ALLOWED_OPS = frozenset({
    # structure
    "Const", "Placeholder", "PlaceholderWithDefault", "Identity", "IdentityN", "NoOp",
    "StopGradient", "PreventGradient", "CheckNumerics",
    # convolution, pooling, normalisation
    "Conv2D", "DepthwiseConv2dNative", "BiasAdd", "AvgPool", "MaxPool", "FusedBatchNorm",
    "FusedBatchNormV2", "FusedBatchNormV3", "BatchNormWithGlobalNormalization", "LRN",
    "MatMul", "BatchMatMul", "BatchMatMulV2",
    # element-wise arithmetic and activations
    "Add", "AddV2", "AddN", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum",
    "Neg", "Abs", "Square", "SquaredDifference", "Sqrt", "Rsqrt", "Reciprocal", "Exp", "Log",
    "Pow", "Tanh", "Sigmoid", "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus",
    "Softsign", "Erf", "Floor", "Round", "ClipByValue", "Softmax", "LogSoftmax",
    # reductions
    "Mean", "Sum", "Max", "Min", "Prod", "ArgMax",
    # shapes and layout
    "Shape", "Reshape", "Squeeze", "ExpandDims", "Pack", "Unpack", "StridedSlice", "Slice",
    "Concat", "ConcatV2", "Split", "SplitV", "Transpose", "Pad", "PadV2", "MirrorPad", "Cast",
    # quantization-aware graphs (TF-slim's quantized MobileNet v1)
    "FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxArgs",
    # TF for Poets 1's JPEG front end (cut away before anything runs)
    "DecodeJpeg", "DecodePng", "ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic",
})

#: Bytes per element of each DataType a constant may hold (tensorflow/core/framework/types.proto
#: numbers); DT_STRING (7) is sized by its values.
_ITEM_BYTES = {1: 4, 2: 8, 3: 4, 4: 1, 5: 2, 6: 1, 9: 8, 10: 1, 14: 2, 17: 2, 19: 2, 22: 4,
               23: 8}
_STRING = 7
#: The TensorProto field that holds each DataType's values when tensor_content is empty.
_VALUE_FIELDS = ("float_val", "double_val", "int_val", "int64_val", "bool_val", "half_val",
                 "string_val", "uint32_val", "uint64_val")


def check(graph_def, where: str, limits=LIMITS) -> None:
    """Refuse ``graph_def`` (from ``where``) unless every op is allowed and every constant is
    what it says and within the limits: one UnsafeModel line naming the op or node."""
    if len(graph_def.library.function):
        raise UnsafeModel(f"{shown(where)} holds a function library "
                          f"({len(graph_def.library.function)} functions), which a frozen image "
                          "classifier does not need; it is not run",
                          hint="freeze the model into plain ops (convert_variables_to_constants)")
    total = 0
    for node in graph_def.node:
        if node.op not in ALLOWED_OPS:
            raise UnsafeModel(f"{shown(where)} holds op {shown(node.op)} (node "
                              f"'{shown(node.name)}'), which is not one a frozen image "
                              "classifier is made of; the graph is not run",
                              hint="docs/ARCHITECTURE.md lists the ops allowed in a graph")
        if node.op == "Const":
            total += _constant_bytes(node, where, limits)
    if total > limits.graph_constants_bytes:
        raise UnsafeModel(f"{shown(where)} declares {size_text(total)} of constants, more than the "
                          f"limit of {size_text(limits.graph_constants_bytes)}")


def _constant_bytes(node, where: str, limits) -> int:
    """The bytes a Const node declares, after checking its values match its shape."""
    tensor = node.attr["value"].tensor
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise UnsafeModel(f"constant '{shown(node.name)}' of {shown(where)} has shape {dims}")
    count = 1
    for size in dims:
        count *= size
    dtype = tensor.dtype
    if dtype == _STRING:
        declared = sum(len(value) for value in tensor.string_val)
        if len(tensor.string_val) > count:
            raise UnsafeModel(f"constant '{shown(node.name)}' of {shown(where)} holds "
                              f"{len(tensor.string_val)} strings for shape {dims}")
    elif dtype in _ITEM_BYTES:
        declared = count * _ITEM_BYTES[dtype]
        content = len(tensor.tensor_content)
        values = max(len(getattr(tensor, name)) for name in _VALUE_FIELDS)
        if content and content != declared:
            raise UnsafeModel(f"constant '{shown(node.name)}' of {shown(where)} holds "
                              f"{content} bytes for shape {dims} ({declared} expected)")
        if not content and values > count:
            raise UnsafeModel(f"constant '{shown(node.name)}' of {shown(where)} holds "
                              f"{values} values for shape {dims}")
    else:
        raise UnsafeModel(f"constant '{shown(node.name)}' of {shown(where)} is of a type "
                          f"(DataType {dtype}) an image classifier does not use")
    if declared > limits.constant_bytes:
        raise UnsafeModel(f"constant '{shown(node.name)}' of {shown(where)} declares shape "
                          f"{dims} ({size_text(declared)}), more than the limit of "
                          f"{size_text(limits.constant_bytes)}; it is not allocated")
    return declared


def check_shapes(graph, where: str, limits=LIMITS) -> None:
    """After import into ``graph`` (a ``tf.Graph``, which infers static shapes without running
    anything): every tensor's known size fits :attr:`Limits.tensor_elements`, so no op can be
    made to allocate more than that at run time by a small file."""
    for operation in graph.get_operations():
        for tensor in operation.outputs:
            if tensor.shape.rank is None:
                continue
            count = 1
            for size in tensor.shape.as_list():
                count *= size or 1
            if count > limits.tensor_elements:
                raise UnsafeModel(f"{shown(where)} computes '{shown(tensor.name)}' of shape "
                                  f"{tensor.shape.as_list()} ({count:,} elements), more than "
                                  f"the limit of {limits.tensor_elements:,}; it is not run")

