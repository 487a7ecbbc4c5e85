"""NeuralNetwork layers of arithmetic: activations, unary functions, elementwise and
broadcastable binary layers, clip, reductions, softmax, inner products and matmuls.

Semantics are NeuralNetwork.proto's: e.g. ``unary`` applies its function to
``scale * x + shift``, an elementwise layer of one input applies its ``alpha``, the legacy
``reduce`` and ``softmax`` work on the (C, H, W) axes of rank-5 blobs, inner products of a
feature map flatten it channel first. Activations and elementwise layers work in place when the
scheduler lets them (``plan.writable``). See ``nn_layers`` for the builder convention.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes import kernels
from toolchain.runtimes.nn_layers import LAYERS, align, axis
from toolchain.runtimes.plan import writable


def _channel_vector(values, x):
    """A per-channel (axis -3) parameter of length C or 1, broadcastable against x."""
    return values.reshape(-1, 1, 1) if x.ndim >= 3 else values


def _softplus(x):
    return np.logaddexp(np.float32(0), x).astype(np.float32)


@LAYERS.register("activation")
def _activation(p, layer, weights):
    kind = p.WhichOneof("NonlinearityType")
    a = getattr(p, kind) if kind else None
    if kind == "ReLU":
        return lambda args, owned: np.maximum(args[0], 0, out=writable(args[:1], owned))
    if kind == "linear":
        alpha, beta = np.float32(a.alpha), np.float32(a.beta)

        def linear(args, owned):
            y = np.multiply(args[0], alpha, out=writable(args[:1], owned))
            if beta:
                y += beta
            return y
        return linear
    if kind in ("PReLU", "parametricSoftplus"):
        count = max(len(a.alpha.floatValue), len(a.alpha.float16Value), 1)
        alpha = weights(a.alpha, (count,), "alpha")
        beta = weights(a.beta, (count,), "beta") if kind == "parametricSoftplus" else None
    simple = {
        "leakyReLU": lambda x: np.where(x >= 0, x, np.float32(a.alpha) * x),
        "thresholdedReLU": lambda x: np.where(x >= np.float32(a.alpha), x, np.float32(0)),
        "tanh": np.tanh,
        "scaledTanh": lambda x: np.float32(a.alpha) * np.tanh(np.float32(a.beta) * x),
        "sigmoid": kernels.sigmoid,
        "sigmoidHard": lambda x: np.clip(np.float32(a.alpha) * x + np.float32(a.beta), 0, 1),
        "ELU": lambda x: np.where(x >= 0, x, np.float32(a.alpha) * np.expm1(np.minimum(x, 0))),
        "softsign": lambda x: x / (1 + np.abs(x)),
        "softplus": _softplus,
        "PReLU": lambda x: np.where(x >= 0, x, _channel_vector(alpha, x) * x),
        "parametricSoftplus": lambda x: (_channel_vector(alpha, x)
                                         * _softplus(_channel_vector(beta, x) * x)),
    }.get(kind)
    if simple is None:
        raise LAYERS.unsupported("activation", layer.name, f"{kind or 'no'} nonlinearity")
    return lambda args, owned: kernels.to_float32(simple(args[0]))


@LAYERS.register("unary")
def _unary(p, layer, weights):
    scale, shift = np.float32(p.scale or 1.0), np.float32(p.shift)
    alpha, epsilon = np.float32(p.alpha), np.float32(p.epsilon or 1e-6)
    ops = {  # UnaryFunctionLayerParams.Operation, applied to scale * x + shift
        0: lambda x, out: np.sqrt(x, out=out),
        1: lambda x, out: np.reciprocal(np.sqrt(np.add(x, epsilon, out=out), out=out), out=out),
        2: lambda x, out: np.reciprocal(np.add(x, epsilon, out=out), out=out),
        3: lambda x, out: np.power(x, alpha, out=out),
        4: lambda x, out: np.exp(x, out=out),
        5: lambda x, out: np.log(x, out=out),
        6: lambda x, out: np.abs(x, out=out),
        7: lambda x, out: np.maximum(x, alpha, out=out),
    }
    op = ops.get(p.type)
    if op is None:
        raise LAYERS.unsupported("unary", layer.name, f"operation {p.type}")

    def unary(args, owned):
        x, out = args[0], writable(args[:1], owned)
        if scale != 1 or shift != 0:
            x = out = np.multiply(x, scale, out=out)
            x += shift
        with np.errstate(divide="ignore", invalid="ignore"):
            return op(x, out)
    return unary


def _combine(args, owned, ufunc):
    """Fold a commutative ufunc over the inputs, in place into an owned full-size input."""
    arrays = align(args)
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    target = writable(arrays, owned, shape)
    if target is None:
        result, rest = ufunc(arrays[0], arrays[1]), arrays[2:]
    else:
        result, rest = target, [a for a in arrays if a is not target]
    for array in rest:
        ufunc(result, array, out=result)
    return result


def _elementwise(ufunc, scalar=None, mean=False):
    def build(p, layer, weights):
        alpha = np.float32(getattr(p, "alpha", 0))

        def run(args, owned):
            if len(args) == 1:
                if scalar is None:  # max / min / average of one input: itself
                    return args[0].copy()
                return scalar(args[0], alpha, out=writable(args[:1], owned))
            y = _combine(args, owned, ufunc)
            if mean:
                y /= np.float32(len(args))
            return y
        return run
    return build


LAYERS.register("add")(_elementwise(np.add, np.add))
LAYERS.register("multiply")(_elementwise(np.multiply, np.multiply))
LAYERS.register("average")(_elementwise(np.add, mean=True))
LAYERS.register("max", "maxBroadcastable")(_elementwise(np.maximum))
LAYERS.register("min", "minBroadcastable")(_elementwise(np.minimum))
LAYERS.register("addBroadcastable")(_elementwise(np.add))
LAYERS.register("multiplyBroadcastable")(_elementwise(np.multiply))


def _binary(ufunc):
    def build(p, layer, weights):
        def run(args, owned):
            if len(args) != 2:
                raise ModelError(f"layer {layer.name!r} needs 2 inputs, got {len(args)}")
            a, b = align(args)
            with np.errstate(divide="ignore", invalid="ignore"):
                return kernels.to_float32(ufunc(a, b))
        return run
    return build


LAYERS.register("subtractBroadcastable")(_binary(np.subtract))
LAYERS.register("divideBroadcastable")(_binary(np.divide))
LAYERS.register("powBroadcastable")(_binary(np.power))


@LAYERS.register("clip")
def _clip(p, layer, weights):
    low, high = np.float32(p.minVal), np.float32(p.maxVal)
    return lambda args, owned: np.clip(args[0], low, high, out=writable(args[:1], owned))


_REDUCERS = {
    "reduceMean": lambda x, axes, keep: x.mean(axis=axes, keepdims=keep, dtype=np.float32),
    "reduceSum": lambda x, axes, keep: x.sum(axis=axes, keepdims=keep, dtype=np.float32),
    "reduceMax": lambda x, axes, keep: x.max(axis=axes, keepdims=keep),
    "reduceMin": lambda x, axes, keep: x.min(axis=axes, keepdims=keep),
    "reduceProd": lambda x, axes, keep: x.prod(axis=axes, keepdims=keep, dtype=np.float32),
    "reduceL1": lambda x, axes, keep: np.abs(x).sum(axis=axes, keepdims=keep),
    "reduceL2": lambda x, axes, keep: np.sqrt(np.square(x).sum(axis=axes, keepdims=keep)),
    "reduceLogSum": lambda x, axes, keep: np.log(x.sum(axis=axes, keepdims=keep)),
    "reduceSumSquare": lambda x, axes, keep: np.square(x).sum(axis=axes, keepdims=keep),
    "reduceLogSumExp": lambda x, axes, keep: _logsumexp(x, axes, keep),
}


def _logsumexp(x, axes, keep):
    top = x.max(axis=axes, keepdims=True)
    y = np.log(np.exp(x - top).sum(axis=axes, keepdims=True)) + top
    return y if keep else y.squeeze(axis=axes)


@LAYERS.register(*_REDUCERS)
def _reduce_nd(p, layer, weights):
    reducer = _REDUCERS[layer.WhichOneof("layer")]

    def run(args, owned):
        x = args[0]
        rank = x.ndim - 1
        axes = (tuple(range(1, rank + 1)) if p.reduceAll
                else tuple(sorted({axis(int(a), rank, layer) for a in p.axes})))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = kernels.to_float32(reducer(x, axes, p.keepDims))
        return y.reshape(len(x), 1) if y.ndim == 1 else y  # Core ML has no rank-0 tensors
    return run


@LAYERS.register("reduce")
def _reduce(p, layer, weights):
    axes = {0: (-3, -2, -1), 1: (-2, -1), 2: (-3,), 3: (-2,), 4: (-1,)}[p.axis]
    epsilon = np.float32(p.epsilon or 1e-6)
    modes = {0: "reduceSum", 1: "reduceMean", 2: "reduceProd", 4: "reduceSumSquare",
             5: "reduceL1", 6: "reduceL2", 7: "reduceMax", 8: "reduceMin"}

    def run(args, owned):
        x = args[0]
        if p.mode == 3:  # LOGSUM: sum of ln(x + epsilon)
            return np.log(x + epsilon).sum(axis=axes, keepdims=True, dtype=np.float32)
        if p.mode == 9:  # ARGMAX, along one axis
            if len(axes) != 1:
                raise LAYERS.unsupported("reduce", layer.name, "ARGMAX over several axes")
            return np.argmax(x, axis=axes[0], keepdims=True).astype(np.float32)
        return kernels.to_float32(_REDUCERS[modes[p.mode]](x, axes, True))
    if p.mode not in modes and p.mode not in (3, 9):
        raise LAYERS.unsupported("reduce", layer.name, f"mode {p.mode}")
    return run


@LAYERS.register("softmax")
def _softmax(p, layer, weights):
    return lambda args, owned: kernels.softmax(args[0], -3)


@LAYERS.register("softmaxND")
def _softmax_nd(p, layer, weights):
    def run(args, owned):
        return kernels.softmax(args[0], axis(int(p.axis), args[0].ndim - 1, layer))
    return run


@LAYERS.register("innerProduct")
def _inner_product(p, layer, weights):
    if getattr(p, "int8DynamicQuantize", False):
        raise LAYERS.unsupported("innerProduct", layer.name, "int8DynamicQuantize")
    cin, cout = int(p.inputChannels), int(p.outputChannels)
    w = np.ascontiguousarray(weights(p.weights, (cout, cin)).T)
    b = weights(p.bias, (cout,), "bias") if p.hasBias else None

    def run(args, owned):
        x = args[0]
        rank, n = x.ndim - 1, len(x)
        if rank == 4:  # (x1, C, H, W) → (x1, C_out, 1, 1)
            y, shape = x.reshape(n, x.shape[1], -1) @ w, (n, x.shape[1], cout, 1, 1)
        elif rank == 5:  # (x1, x2, C, H, W) → (x1, x2, C_out, 1, 1)
            y, shape = x.reshape(n, *x.shape[1:3], -1) @ w, (n, *x.shape[1:3], cout, 1, 1)
        else:
            y, shape = x @ w, (*x.shape[:-1], cout)
        if b is not None:
            y += b
        return y.reshape(shape)
    return run


@LAYERS.register("batchedMatmul")
def _batched_matmul(p, layer, weights):
    if p.int8DynamicQuantize:
        raise LAYERS.unsupported("batchedMatmul", layer.name, "int8DynamicQuantize")
    if len(layer.input) == 1:
        x1, x2 = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
        # Stored as the transpose, [X2, X1] row-major (coremltools writes W.T; see the proto).
        w = np.ascontiguousarray(weights(p.weights, (x2, x1)).T)
        b = weights(p.bias, (x2,), "bias") if p.hasBias else None

        def run(args, owned):
            y = args[0] @ w
            if b is not None:
                y += b
            return y
        return run

    def run_two(args, owned):
        a, b = args
        if p.transposeA and a.ndim > 2:
            a = np.swapaxes(a, -1, -2)
        if p.transposeB and b.ndim > 2:
            b = np.swapaxes(b, -1, -2)
        if a.ndim == 2:  # a rank-1 example (D) is (1, D)
            a = a[:, None, :]
        if b.ndim == 2:  # and a rank-1 second operand (D) is (D, 1)
            b = b[:, :, None]
        a, b = align([a, b])
        return np.matmul(a, b)
    return run_two
