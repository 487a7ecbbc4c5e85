"""NumPy executor for Core ML ML Programs (``.mlpackage``): Core ML's arithmetic where Core ML
itself does not run (Linux), so the verifier can still check the artifact the apps ship.

The program is read straight from the spec (``spec.mlProgram``, weights from the package's blob
file through coremltools' ``BlobReader``) and turned once into a plan: constants resolved to
float32 arrays (float16 and int8 weights dequantized as their ``constexpr`` ops define), then one
step per op, in program order. ``predict`` only does the arithmetic, NCHW float32, all images of a
batch at once. Semantics follow coremltools' MIL op definitions (``converters/mil/mil/ops/defs``):
the reference, not TensorFlow. An op this file does not implement is an ``UnsupportedLayer`` that
names it; nothing is skipped.

Batching: a program declares batch 1. Every op here keeps the batch as the leading axis, so
images go through together, in blocks sized so that the largest intermediate tensor of a block
stays within a few MiB (cache-resident: about 1.5x faster than the whole batch at once on
MobileNetV2/224). A program whose ops would mix the batch axis with others (a transpose moving
axis 0, a reduction over it, ...) runs one declared batch at a time instead. Every result is
checked against the shape the program declares, so semantics that disagree with coremltools'
shape inference fail loudly. Values are freed after their last use, and activations overwrite
an input that nothing else reads.

Precision: ops whose declared output is float16 (``compute_precision=FLOAT16`` programs) round
their results to float16, as Core ML computes them; ``compute_precision="float16"`` rounds the
weights and every op's output to float16, to approximate the GPU and Neural Engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import (
    ModelError,
    ToolchainError,
    UnsupportedLayer,
    UsageError,
    describe,
)
from toolchain.runtimes import check_precision, kernels

_REQUIRED = object()
_NUMPY = {"FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64, "BOOL": np.bool_,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
_BLOB_READ = {"FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data",
              "INT8": "read_int8_data", "UINT8": "read_uint8_data", "INT16": "read_int16_data",
              "UINT16": "read_uint16_data", "INT32": "read_int32_data",
              "UINT32": "read_uint32_data"}
_CASTS = {"fp16": np.float16, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8,
          "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "bool": np.bool_}


def _unsupported(op_type: str, name: str, what: str = "") -> UnsupportedLayer:
    detail = f" ({what})" if what else ""
    return UnsupportedLayer(f"the NumPy Core ML executor does not implement op type {op_type!r}"
                            f"{detail} (op {name!r})")


def _round16(value):
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(np.float16).astype(np.float32)
    return value


class _Values:
    """Reads MIL values: immediate tensors, lists, and tensors stored in the weights blob file."""

    def __init__(self, weights_dir: Path | None) -> None:
        self.weights_dir, self._readers = weights_dir, {}

    def read(self, value, op_type: str, name: str) -> Any:
        from coremltools.proto import MIL_pb2

        kind = value.type.WhichOneof("type")
        if kind == "listType":
            return [self.read(item, op_type, name) for item in value.immediateValue.list.values]
        if kind != "tensorType":
            raise _unsupported(op_type, name, f"a {kind} value")
        tensor_type = value.type.tensorType
        dtype = MIL_pb2.DataType.Name(tensor_type.dataType)
        shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
        if dtype == "STRING":
            strings = list(value.immediateValue.tensor.strings.values)
            return strings[0] if not shape else np.array(strings, dtype=object).reshape(shape)
        if dtype not in _NUMPY:
            raise _unsupported(op_type, name, f"{dtype.lower()} values")
        if value.WhichOneof("value") == "blobFileValue":
            data = self._blob(value.blobFileValue, dtype, op_type, name)
        else:
            tensor = value.immediateValue.tensor
            source = tensor.WhichOneof("value")
            if source == "bytes":
                data = np.frombuffer(tensor.bytes.values, _NUMPY[dtype])
            else:
                data = np.array(getattr(tensor, source).values if source else [], _NUMPY[dtype])
        return data.astype(_NUMPY[dtype], copy=False).reshape(shape)

    def _blob(self, blob, dtype: str, op_type: str, name: str) -> np.ndarray:
        if dtype not in _BLOB_READ:
            raise _unsupported(op_type, name, f"{dtype.lower()} weights in the blob file")
        path = Path(self.weights_dir or "") / blob.fileName.split("/")[-1]
        if path not in self._readers:
            if self.weights_dir is None or not path.is_file():
                raise ModelError(f"the ML Program's weights file {path.name} is missing "
                                 f"(op {name!r} needs it)")
            from coremltools.libmilstoragepython import _BlobStorageReader

            self._readers[path] = _BlobStorageReader(str(path))
        data = getattr(self._readers[path], _BLOB_READ[dtype])(blob.offset)
        # A copy: the reader's arrays may point into its memory, which ends with it.
        return np.frombuffer(data.tobytes(), _NUMPY[dtype]).copy()


@dataclass
class _Step:
    op_type: str
    name: str
    run: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    round16: tuple[bool, ...]
    #: The output shapes the program declares (batch 1): a result of another shape is an error.
    declared: tuple[tuple, ...] = ()
    release: tuple[str, ...] = ()
    #: The input whose array this step may overwrite with its result (see Executor._schedule).
    inplace: int | None = None


@dataclass
class _Op:
    """One op of the program while the plan is built: its constant and runtime inputs."""

    proto: Any
    plan: _Planner
    type: str = field(init=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.type, self.name = self.proto.type, self.proto.outputs[0].name

    def _bindings(self, key: str) -> list[tuple[str, Any]] | None:
        """``("name", variable)`` or ``("value", Value proto)`` for each argument of ``key``."""
        if key in self.proto.inputs:
            return [(b.WhichOneof("binding"), getattr(b, b.WhichOneof("binding")))
                    for b in self.proto.inputs[key].arguments]
        if key in self.proto.attributes and key != "name":
            return [("value", self.proto.attributes[key])]  # iOS 16 constexpr ops keep data here
        return None

    def has(self, key: str) -> bool:
        return self._bindings(key) is not None

    def const(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of a constant input (a runtime value here is an unsupported use)."""
        bindings = self._bindings(key)
        if bindings is None:
            if default is _REQUIRED:
                raise ModelError(f"op {self.name!r} ({self.type}) lacks its input {key!r}")
            return default
        values = []
        for kind, binding in bindings:
            if kind == "name":
                if binding not in self.plan.consts:
                    raise _unsupported(self.type, self.name, f"a runtime {key!r}")
                values.append(self.plan.consts[binding])
            else:
                values.append(self.plan.values.read(binding, self.type, self.name))
        return values[0] if len(values) == 1 else values

    def var(self, key: str) -> str:
        """The name of the variable bound to ``key`` (a constant or a runtime value)."""
        names = self.vars(key)
        if len(names) != 1:
            raise ModelError(f"op {self.name!r} ({self.type}) needs one variable as {key!r}")
        return names[0]

    def vars(self, key: str) -> list[str]:
        bindings = self._bindings(key) or []
        if any(kind != "name" for kind, _ in bindings):
            raise _unsupported(self.type, self.name, f"an inline value as {key!r}")
        return [self.plan.known(name, self) for _, name in bindings]

    def is_const(self, key: str) -> bool:
        return self.var(key) in self.plan.consts

    def rank(self, key: str) -> int:
        return len(self.plan.shapes[self.var(key)])

    def shape(self, key: str) -> tuple:
        return self.plan.shapes[self.var(key)]

    def not_batched(self) -> None:
        """This op mixes the batch axis with others: run the program one batch at a time."""
        self.plan.batchable = False


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(value).reshape(-1))


def _pads_2d(pad_type: str, size, kernel, strides, dilations, custom, op: _Op):
    if pad_type == "valid":
        return ((0, 0), (0, 0))
    if pad_type == "custom":
        return ((custom[0], custom[1]), (custom[2], custom[3]))
    if pad_type in ("same", "same_lower"):
        return kernels.same_pads(tuple(size), tuple(kernel), tuple(strides), tuple(dilations),
                                 lower=pad_type == "same_lower")
    raise ModelError(f"op {op.name!r} ({op.type}) has unknown pad_type {pad_type!r}")


def _spatial(op: _Op, key: str = "x") -> None:
    if op.rank(key) != 4:
        raise _unsupported(op.type, op.name, f"{op.rank(key) - 2} spatial dimensions")


def _conv(op: _Op):
    _spatial(op)
    strides = _ints(op.const("strides", (1, 1)))
    dilations = _ints(op.const("dilations", (1, 1)))
    groups, pad_type = int(op.const("groups", 1)), str(op.const("pad_type", "valid"))
    custom = _ints(op.const("pad", (0, 0, 0, 0)))
    if not op.is_const("weight") or (op.has("bias") and not op.is_const("bias")):
        op.not_batched()
    names = [op.var("x"), op.var("weight")] + ([op.var("bias")] if op.has("bias") else [])

    def run(x, weight, bias=None):
        pads = _pads_2d(pad_type, x.shape[2:], weight.shape[2:], strides, dilations, custom, op)
        return kernels.conv2d(x, weight, bias, strides=strides, dilations=dilations, pads=pads,
                              groups=groups)
    return run, names


def _pool(kind: str):
    def build(op: _Op):
        _spatial(op)
        kernel = _ints(op.const("kernel_sizes"))
        strides = _ints(op.const("strides", (1, 1)))
        pad_type, custom = str(op.const("pad_type")), _ints(op.const("pad", (0, 0, 0, 0)))
        ceil_mode = bool(op.const("ceil_mode", False))
        exclude = kind == "max" or bool(op.const("exclude_padding_from_average", False))

        def run(x):
            pads = _pads_2d(pad_type, x.shape[2:], kernel, strides, (1, 1), custom, op)
            # ceil_mode (coremltools' spatial_dimensions_out_shape): windows that start inside
            # the padded input may run past its end; those cells never count.
            extra = [0, 0]
            for axis, (size, k, s, (before, after)) in enumerate(
                    zip(x.shape[2:], kernel, strides, pads)):
                total = before + after
                out = (size + total - k) // s + 1
                if ceil_mode:
                    out = (size + total - k + s - 1) // s + 1
                    if total > 0 and (out - 1) * s >= size + total / 2:
                        out -= 1
                extra[axis] = max(0, (out - 1) * s + k - size - total)
            if not exclude and any(sum(p) for p in pads):
                x = kernels.pad(x, ((0, 0), (0, 0), *pads))  # padding counts in the average
                pads = ((0, 0), (0, 0))
            pads = tuple((before, after + more) for (before, after), more in zip(pads, extra))
            return kernels.pool2d(x, kind, kernel, strides, pads,
                                  exclude_padding=exclude or any(extra))
        return run, [op.var("x")]
    return build


def _pad(op: _Op):
    pads = _ints(op.const("pad"))
    mode, value = str(op.const("mode", "constant")), float(op.const("constant_val", 0.0))
    if mode not in ("constant", "reflect", "replicate"):
        raise _unsupported(op.type, op.name, f"mode {mode!r}")
    count, rank = len(pads) // 2, op.rank("x")
    widths = [(0, 0)] * (rank - count) + [(pads[2 * i], pads[2 * i + 1]) for i in range(count)]
    if widths[0] != (0, 0):
        op.not_batched()
    return (lambda x: kernels.pad(x, widths, mode, value)), [op.var("x")]


def _unary(function: Callable):
    def build(op: _Op):
        return function(op), [op.var("x")]
    return build


def _relu(x, out=None):
    return np.maximum(x, np.float32(0), out=out)


def _clamp(low, high):
    def run(x, out=None):
        y = np.maximum(x, low, out=out)
        return np.minimum(y, high, out=y)
    return run


def _sigmoid(x):
    return (np.tanh(x * np.float32(0.5)) + np.float32(1)) * np.float32(0.5)


def _alpha_beta(op: _Op, alpha=_REQUIRED, beta=_REQUIRED):
    return np.float32(op.const("alpha", alpha)), np.float32(op.const("beta", beta))


def _clip(op: _Op):
    return _clamp(*_alpha_beta(op))


def _sigmoid_hard(op: _Op):
    alpha, beta = _alpha_beta(op, 0.2, 0.5)
    clamp = _clamp(np.float32(0), np.float32(1))

    def run(x, out=None):
        y = np.multiply(x, alpha, out=out)
        y += beta
        return clamp(y, out=y)
    return run


def _leaky_relu(op: _Op):
    alpha = np.float32(op.const("alpha", 0.01))
    return lambda x: np.where(x >= 0, x, x * alpha)


def _cast(op: _Op):
    dtype = str(op.const("dtype"))
    if dtype not in _CASTS:
        raise _unsupported(op.type, op.name, f"dtype {dtype!r}")
    if dtype == "fp16":
        return lambda x: x.astype(np.float16).astype(np.float32)
    return lambda x: x.astype(_CASTS[dtype])


def _binary(function: Callable):
    def build(op: _Op):
        names = [op.var("x"), op.var("y")]
        runtime = [n for n in names if n not in op.plan.consts]
        for name in names:
            if name in op.plan.consts and runtime:
                shape, other = op.plan.shapes[name], op.plan.shapes[runtime[0]]
                if len(shape) > len(other) or (len(shape) == len(other) and shape
                                               and shape[0] != 1):
                    op.not_batched()

        def run(x, y, out=None):
            if out is not None and (out.shape != np.broadcast_shapes(x.shape, y.shape)
                                    or out.dtype != np.result_type(x, y)):
                out = None
            return function(x, y, out=out)
        return run, names
    return build


def _axes(values, rank: int) -> tuple[int, ...]:
    return tuple(sorted(int(a) % rank for a in np.asarray(values).reshape(-1)))


def _reduce(function: Callable):
    def build(op: _Op):
        rank = op.rank("x")
        axes = op.const("axes", None)
        axes = tuple(range(rank)) if axes is None else _axes(axes, rank)
        keep = bool(op.const("keep_dims", False))
        if 0 in axes:
            op.not_batched()
        return (lambda x: function(x, axis=axes, keepdims=keep)), [op.var("x")]
    return build


def _concat(op: _Op):
    names = op.vars("values")
    rank = len(op.plan.shapes[names[0]])
    axis, interleave = int(op.const("axis")) % rank, bool(op.const("interleave", False))
    if axis == 0 or any(name in op.plan.consts for name in names):
        op.not_batched()

    def run(*values):
        if not interleave:
            return np.concatenate(values, axis=axis)
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return run, names


def _transpose(op: _Op):
    perm = _ints(op.const("perm"))
    if perm and perm[0] % len(perm) != 0:
        op.not_batched()
    return (lambda x: np.transpose(x, perm)), [op.var("x")]


def _reshape(op: _Op):
    shape, declared = list(_ints(op.const("shape"))), op.shape("x")
    if 0 in shape and len(shape) == len(declared):
        shape = [d if s == 0 else s for s, d in zip(shape, declared)]
    if not declared or not shape or shape[0] != declared[0] or None in declared:
        op.not_batched()

    def run(x):  # a reshape that keeps the batch axis keeps it for any batch size
        return x.reshape([x.shape[0], *shape[1:]] if shape[0] == declared[0] else shape)
    return run, [op.var("x")]


def _squeeze(op: _Op):
    declared = op.shape("x")
    axes = op.const("axes", None)
    axes = (tuple(i for i, d in enumerate(declared) if d == 1) if axes is None
            else _axes(axes, len(declared)))
    if 0 in axes:
        op.not_batched()
    return (lambda x: np.squeeze(x, axis=axes)), [op.var("x")]


def _expand_dims(op: _Op):
    values = _ints(op.const("axes"))
    axes = _axes(values, op.rank("x") + len(values))
    if 0 in axes:
        op.not_batched()
    return (lambda x: np.expand_dims(x, axes)), [op.var("x")]


def _matmul(op: _Op):
    tx, ty = bool(op.const("transpose_x", False)), bool(op.const("transpose_y", False))
    names = [op.var("x"), op.var("y")]
    for key, name, transposed in (("x", names[0], tx), ("y", names[1], ty)):
        rank, const = op.rank(key), name in op.plan.consts
        if (not const and (rank == 1 or (rank == 2 and (key == "y" or transposed)))
                or const and rank >= 3 and (op.shape(key)[0] != 1
                                            or rank > op.rank("y" if key == "x" else "x"))):
            op.not_batched()

    def run(x, y):
        if tx and x.ndim > 1:
            x = np.swapaxes(x, -1, -2)
        if ty and y.ndim > 1:
            y = np.swapaxes(y, -1, -2)
        return np.matmul(x, y)
    return run, names


def _linear(op: _Op):
    if op.rank("x") == 1:
        op.not_batched()
    weight = np.ascontiguousarray(np.asarray(op.const("weight")).T)
    bias = op.const("bias", None)

    def run(x):
        y = x @ weight
        return y if bias is None else y + bias
    return run, [op.var("x")]


def _softmax(op: _Op):
    axis = int(op.const("axis", -1)) % op.rank("x")
    if axis == 0:
        op.not_batched()
    return (lambda x: kernels.softmax(x, axis)), [op.var("x")]


def _classify(op: _Op):
    classes = op.const("classes")
    classes = [classes] if not isinstance(classes, list) else classes
    labels = tuple(str(np.asarray(c).reshape(-1)[0]) if not isinstance(c, str) else c
                   for c in classes)
    op.plan.labels = labels
    if op.rank("probabilities") < 2:
        op.not_batched()

    def run(probabilities):
        rows = probabilities.reshape(-1, len(labels)) if probabilities.ndim < 2 else (
            probabilities.reshape(probabilities.shape[0], -1))
        if rows.shape[1] != len(labels):
            raise ModelError(f"classify got {rows.shape[1]} probabilities for "
                             f"{len(labels)} classes")
        return np.array(labels, dtype=object)[np.argmax(rows, axis=1)], rows
    return run, [op.var("probabilities")]


def _affine(data, scale, zero_point, axis: int) -> np.ndarray:
    """``scale * (data - zero_point)``; a vector scale / zero point runs along ``axis``."""
    def along(v):
        v = np.asarray(v, np.float32)
        if v.ndim == 0:
            return v
        shape = [1] * data.ndim
        shape[axis % data.ndim] = -1
        return v.reshape(shape)
    return (np.asarray(data, np.float32) - along(zero_point)) * along(scale)


def _affine_dequantize(op: _Op) -> np.ndarray:
    """iOS 16 ``constexpr_affine_dequantize`` (what linear_quantize_weights writes for iOS 16)."""
    return _affine(op.const("quantized_data"), op.const("scale"), op.const("zero_point"),
                   int(op.const("axis")))


def _dequantize(op: _Op):
    """iOS 17 ``dequantize``: the same arithmetic on a (usually constant) int8 tensor."""
    scale, zero = op.const("scale"), op.const("zero_point", 0)
    axis = int(op.const("axis", 0))
    if np.ndim(scale) and axis % op.rank("input") == 0:
        op.not_batched()
    return (lambda x: _affine(x, scale, zero, axis)), [op.var("input")]


def _blockwise_shift_scale(op: _Op):
    """iOS 18: ``scale * (data - offset)``, each scale covering a block of ``data``."""
    data = np.asarray(op.const("data")).astype(np.float32)
    scale = np.asarray(op.const("scale"), np.float32)
    offset = op.const("offset", None)

    def blocks(v):
        for axis, (size, count) in enumerate(zip(data.shape, v.shape)):
            v = np.repeat(v, size // count, axis=axis)
        return v
    if offset is not None:
        data = data - blocks(np.asarray(offset, np.float32))
    return data * blocks(scale)


#: Ops computed while the plan is built: constant inputs give a constant output.
_CONSTEXPR = {
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_cast": lambda op: np.asarray(op.const("source_val"), np.float32),
}
#: Ops run at predict time: each builder returns (function of the input arrays, input names).
_OPS: dict[str, Callable[[_Op], tuple[Callable, list[str]]]] = {
    "conv": _conv, "max_pool": _pool("max"), "avg_pool": _pool("avg"), "pad": _pad,
    "relu": _unary(lambda op: _relu),
    "relu6": _unary(lambda op: _clamp(np.float32(0), np.float32(6))),
    "sigmoid": _unary(lambda op: _sigmoid), "tanh": _unary(lambda op: np.tanh),
    "silu": _unary(lambda op: lambda x: x * _sigmoid(x)),
    "sigmoid_hard": _unary(_sigmoid_hard), "clip": _unary(_clip),
    "leaky_relu": _unary(_leaky_relu), "cast": _unary(_cast),
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "concat": _concat, "transpose": _transpose, "reshape": _reshape, "squeeze": _squeeze,
    "expand_dims": _expand_dims, "matmul": _matmul, "linear": _linear, "softmax": _softmax,
    "classify": _classify, "dequantize": _dequantize,
}


#: Ops that can write their result into an input's array (their functions take ``out=``).
_INPLACE = {"relu", "relu6", "clip", "sigmoid_hard", "add", "sub", "mul", "real_div",
            "maximum", "minimum"}
#: Ops whose results are always newly allocated arrays, never views of an input.
_FRESH = _INPLACE | {"conv", "max_pool", "avg_pool", "sigmoid", "tanh", "silu", "leaky_relu",
                     "cast", "reduce_mean", "reduce_sum", "reduce_max", "concat", "matmul",
                     "linear", "softmax"}
#: Images per block: the largest intermediate tensor of a block stays within about this much.
_BLOCK_BYTES = 8 << 20


class _Planner:
    """Turns the program's main block into constants and steps."""

    def __init__(self, block, inputs: dict[str, tuple], values: _Values, half: bool) -> None:
        self.values, self.half = values, half
        self.consts: dict[str, Any] = {}
        self.shapes: dict[str, tuple] = dict(inputs)
        self.steps: list[_Step] = []
        self.batchable, self.labels = True, ()
        for proto in block.operations:
            self._add(_Op(proto, self))

    def known(self, name: str, op: _Op) -> str:
        if name not in self.shapes:
            raise ModelError(f"op {op.name!r} ({op.type}) uses {name!r} before it is defined")
        return name

    def _constant(self, name: str, value, declared_half: bool) -> None:
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = value.astype(np.float32)
            if self.half or declared_half:
                value = _round16(value)
        self.consts[name] = value

    def _add(self, op: _Op) -> None:
        from coremltools.proto import MIL_pb2

        outputs = op.proto.outputs
        for output in outputs:
            dims = output.type.tensorType.dimensions
            self.shapes[output.name] = tuple(
                int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None
                for d in dims)
        halves = tuple(o.type.WhichOneof("type") == "tensorType"
                       and o.type.tensorType.dataType == MIL_pb2.FLOAT16 for o in outputs)
        if op.proto.blocks:
            raise _unsupported(op.type, op.name, "nested blocks")
        if op.type == "const":
            self._constant(op.name, op.const("val"), halves[0])
            return
        if op.type in _CONSTEXPR:
            self._constant(op.name, _CONSTEXPR[op.type](op), halves[0])
            return
        if op.type not in _OPS:
            raise _unsupported(op.type, op.name)
        run, names = _OPS[op.type](op)
        round16 = tuple(self.half or h for h in halves)
        step = _Step(op.type, op.name, run, tuple(names), tuple(o.name for o in outputs),
                     round16, tuple(self.shapes[o.name] if _ranked(o) else None
                                    for o in outputs))
        if op.type != "classify" and all(name in self.consts for name in names):
            for name, value in zip(step.outputs, _execute_step(step, self.consts)):
                self.consts[name] = value  # constant folding: nothing left to do at run time
            return
        self.steps.append(step)


def _ranked(output) -> bool:
    """Whether the program declares this output's full shape (tensors, not dictionaries)."""
    from coremltools.proto import MIL_pb2

    if output.type.WhichOneof("type") != "tensorType":
        return False
    tensor = output.type.tensorType
    return tensor.rank == len(tensor.dimensions) and tensor.dataType != MIL_pb2.STRING


def _execute_step(step: _Step, env: dict) -> tuple:
    args = [env[name] for name in step.inputs]
    try:
        result = (step.run(*args) if step.inplace is None
                  else step.run(*args, out=args[step.inplace]))
    except ToolchainError:
        raise
    except Exception as error:  # noqa: BLE001 (NumPy raises assorted types: shapes, dtypes)
        raise ModelError(f"op {step.name!r} ({step.op_type}) failed: {describe(error)}") from None
    results = result if len(step.outputs) > 1 else (result,)
    for value, shape in zip(results, step.declared):
        if shape is not None and (np.ndim(value) != len(shape) or any(
                want is not None and got != want
                for got, want in zip(np.shape(value)[1:], shape[1:]))):
            raise ModelError(f"op {step.name!r} ({step.op_type}) computed shape "
                             f"{np.shape(value)}, the program declares {shape}")
    return tuple(_round16(r) if half else r for r, half in zip(results, step.round16))


class Executor:
    """Runs one ML Program (``spec.mlProgram``) with NumPy; see the module docstring."""

    def __init__(self, spec, path, compute_precision: str = "float32") -> None:
        check_precision(compute_precision)
        if spec.WhichOneof("Type") != "mlProgram":
            raise ModelError("the Core ML model is not an ML Program")
        self.compute_precision = compute_precision
        description = spec.description
        function_name = description.defaultFunctionName or "main"
        if function_name not in spec.mlProgram.functions:
            raise ModelError(f"the ML Program has no function {function_name!r}")
        function = spec.mlProgram.functions[function_name]
        block = function.block_specializations[function.opset]
        self._inputs = {value.name: tuple(
            int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None
            for d in value.type.tensorType.dimensions) for value in function.inputs}
        planner = _Planner(block, self._inputs, _Values(_weights_dir(path)),
                           compute_precision == "float16")
        self._consts, self._steps = planner.consts, planner.steps
        self._batchable, self.labels = planner.batchable, planner.labels
        self._outputs = tuple(block.outputs)
        self._schedule(planner.shapes)
        self._shapes = planner.shapes
        self._batch = next(iter(self._inputs.values()), (1,))[0] if self._inputs else 1
        self.input_name = description.input[0].name if description.input else ""
        self.probabilities_name = description.predictedProbabilitiesName
        image = (description.input[0].type.imageType
                 if description.input and description.input[0].type.WhichOneof("Type")
                 == "imageType" else None)
        self.input_size = int(image.width) if image is not None else None
        if image is not None and image.height != image.width:
            raise ModelError(f"the image input is {image.width}x{image.height}, not square")
        self.color = None if image is None else image.ColorSpace.Name(image.colorSpace)

    def _schedule(self, shapes: dict[str, tuple]) -> None:
        """Free each intermediate value after its last use (a batch's arrays are large), let an
        activation or elementwise op overwrite an input nothing else reads, and size the blocks
        of images that go through the program together."""
        consumers, last, producer = {}, {}, {}
        for index, step in enumerate(self._steps):
            for name in dict.fromkeys(step.inputs):
                consumers[name] = consumers.get(name, 0) + 1
                last[name] = index
            producer.update({name: step.op_type for name in step.outputs})
        for index, step in enumerate(self._steps):
            step.release = tuple(name for name in dict.fromkeys(step.inputs)
                                 if last[name] == index and name not in self._outputs)
            if step.op_type in _INPLACE:
                for position, name in enumerate(step.inputs):
                    # A fresh array read by this step alone: no view of it can exist.
                    if (producer.get(name) in _FRESH and consumers[name] == 1
                            and step.inputs.count(name) == 1 and name not in self._outputs):
                        step.inplace = position
                        break
        largest = max((int(np.prod([d or 1 for d in shapes[name][1:]])) for step in self._steps
                       for name in step.outputs if shapes.get(name)), default=1)
        self._block = max(1, _BLOCK_BYTES // (4 * largest))

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (N, len(labels)) for uint8 RGB images (N, size, size, 3)."""
        if not self.labels or self.input_size is None:
            raise ModelError("the ML Program is not an image classifier")
        if self.color not in ("RGB", "BGR"):
            raise ModelError(f"the model's image input is {self.color}, not RGB or BGR")
        pixels = np.asarray(pixels)
        size = self.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise UsageError(f"expected images of shape (N, {size}, {size}, 3), "
                             f"got {pixels.shape}")
        image = pixels.astype(np.float32).transpose(0, 3, 1, 2)
        if self.color == "BGR":
            image = image[:, ::-1]
        outputs = self.run({self.input_name: np.ascontiguousarray(image)})
        return np.asarray(outputs[self.probabilities_name], np.float32)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the program (a classifier's probability dictionary as an (N, C)
        array in ``labels`` order, its label as an array of strings) for the given inputs."""
        missing = sorted(set(self._inputs) - set(inputs))
        if missing:
            raise UsageError(f"missing model input(s) {missing}")
        arrays = {}
        for name, declared in self._inputs.items():
            array = kernels.to_float32(inputs[name])
            if self.compute_precision == "float16":
                array = _round16(array)
            if array.ndim != len(declared) or any(
                    d is not None and d != a for d, a in zip(declared[1:], array.shape[1:])):
                raise UsageError(f"input {name!r} has shape {array.shape}, "
                                 f"the model expects {declared}")
            arrays[name] = array
        batch = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        declared = {d[0] if d else 1 for d in self._inputs.values()}
        if len(batch) > 1:
            raise UsageError(f"the inputs' batch sizes differ: {sorted(batch)}")
        count = batch.pop() if batch else 1
        if self._batchable:
            # Blocks of images sized to stay in cache: faster than the whole batch at once.
            step = self._block
        elif batch == declared or len(declared) != 1:
            step = count
        else:  # ops that mix the batch axis with others: one declared batch at a time
            step = max(declared.pop() or 1, 1)
        if count <= step:
            return self._execute(arrays)
        parts = [self._execute({n: a[i:i + step] for n, a in arrays.items()})
                 for i in range(0, count, step)]
        return {name: self._join(name, [p[name] for p in parts]) for name in self._outputs}

    def _join(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        """One output for the whole batch: blocks joined along the batch axis, or, for an
        output without one (declared batch 1 ran image by image), one entry per image."""
        declared = self._shapes.get(name) or ()
        if self._batchable or (declared and declared[0] == self._batch):
            return np.concatenate(parts)
        return np.stack(parts)

    def _execute(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = {**self._consts, **arrays}
        for step in self._steps:
            for name, value in zip(step.outputs, _execute_step(step, env)):
                env[name] = value
            for name in step.release:
                del env[name]
        return {name: env[name] for name in self._outputs}


def _weights_dir(path) -> Path | None:
    """The package's weights folder (found as coremltools' MLModel finds it)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        return None
    from coremltools.models.utils import _try_get_weights_dir_path

    found = _try_get_weights_dir_path(str(path))
    return Path(found) if found else path / "Data" / "com.apple.CoreML" / "weights"
