"""ML Program elementwise ops and reductions: activations (relu, relu6, sigmoid, tanh, silu,
sigmoid_hard, clip, leaky_relu), cast, the broadcasting binary ops (add, sub, mul, real_div,
maximum, minimum) and reduce_mean / reduce_sum / reduce_max.

Activations and binary ops write their result into an input the scheduler lets them own
(``plan.writable``), so MobileNet's long chains of them cost no allocations. A constant operand
that would broadcast against the batch axis makes the program run one batch at a time. See
``mil_ops`` for the builder convention.
"""

from __future__ import annotations

import numpy as np

from toolchain.runtimes import kernels
from toolchain.runtimes.mil_ops import OPS, REQUIRED, Op, of_one, sorted_axes
from toolchain.runtimes.plan import to_float16, writable

_CASTS = {"fp16": np.float16, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8,
          "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "bool": np.bool_}


def _in_place(make):
    """A builder for an activation ``make(op)(x, out)`` that may overwrite its input."""
    def build(op: Op):
        fn = make(op)
        return (lambda args, owned: fn(args[0], writable(args[:1], owned))), [op.var("x")]
    return build


def _clamp(low, high):
    def run(x, out):
        y = np.maximum(x, low, out=out)
        return np.minimum(y, high, out=y)
    return run


def _alpha_beta(op: Op, alpha=REQUIRED, beta=REQUIRED):
    return np.float32(op.const("alpha", alpha)), np.float32(op.const("beta", beta))


OPS.register("relu")(_in_place(lambda op: lambda x, out: np.maximum(x, np.float32(0), out=out)))
OPS.register("relu6")(_in_place(lambda op: _clamp(np.float32(0), np.float32(6))))
OPS.register("clip")(_in_place(lambda op: _clamp(*_alpha_beta(op))))
OPS.register("sigmoid")(lambda op: of_one(op, kernels.sigmoid))
OPS.register("tanh")(lambda op: of_one(op, np.tanh))
OPS.register("silu")(lambda op: of_one(op, lambda x: x * kernels.sigmoid(x)))


@OPS.register("sigmoid_hard")
@_in_place
def _sigmoid_hard(op: Op):
    alpha, beta = _alpha_beta(op, 0.2, 0.5)
    clamp = _clamp(np.float32(0), np.float32(1))

    def run(x, out):
        y = np.multiply(x, alpha, out=out)
        y += beta
        return clamp(y, y)
    return run


@OPS.register("leaky_relu")
def _leaky_relu(op: Op):
    alpha = np.float32(op.const("alpha", 0.01))
    return of_one(op, lambda x: np.where(x >= 0, x, x * alpha))


@OPS.register("cast")
def _cast(op: Op):
    dtype = str(op.const("dtype"))
    if dtype not in _CASTS:
        raise OPS.unsupported(op.type, op.name, f"dtype {dtype!r}")
    if dtype == "fp16":  # float16 values, held in float32 as everywhere here
        return of_one(op, lambda x: to_float16(np.asarray(x, np.float16)))
    return of_one(op, lambda x: x.astype(_CASTS[dtype]))


def _binary(function):
    def build(op: Op):
        names = [op.var("x"), op.var("y")]
        consts, shapes = op.lowering.consts, op.lowering.shapes
        runtime = [n for n in names if n not in consts]
        for name in names:
            if name in consts and runtime:
                shape, other = shapes[name], shapes[runtime[0]]
                if len(shape) > len(other) or (len(shape) == len(other) and shape
                                               and shape[0] != 1):
                    op.not_batched()

        def run(args, owned):
            x, y = args
            out = (writable(args, owned, np.broadcast_shapes(np.shape(x), np.shape(y)),
                            np.result_type(x, y)) if any(owned) else None)
            return function(x, y, out=out)
        return run, names
    return build


for _name, _function in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                         ("real_div", np.divide), ("maximum", np.maximum),
                         ("minimum", np.minimum)):
    OPS.register(_name)(_binary(_function))


def _reduce(function):
    def build(op: Op):
        rank = op.rank("x")
        axes = op.const("axes", None)
        axes = tuple(range(rank)) if axes is None else sorted_axes(axes, rank)
        keep = bool(op.const("keep_dims", False))
        if 0 in axes:
            op.not_batched()
        return of_one(op, lambda x: function(x, axis=axes, keepdims=keep))
    return build


OPS.register("reduce_mean")(_reduce(np.mean))
OPS.register("reduce_sum")(_reduce(np.sum))
OPS.register("reduce_max")(_reduce(np.max))
