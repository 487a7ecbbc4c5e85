"""ML Program ops of neural-network layers: conv, max_pool / avg_pool, pad, matmul, linear,
softmax.

The arithmetic is ``kernels``' (shared with the NeuralNetwork executor); this module maps MIL's
parameters onto it: pad_type valid / same / same_lower / custom, pooling's ceil_mode and
exclude_padding_from_average as coremltools defines them, matmul's transposes. See ``mil_ops``
for the builder convention.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes import kernels
from toolchain.runtimes.mil_ops import OPS, Op, ints, of_one


def _pads_2d(pad_type: str, size, kernel, strides, dilations, custom, op: Op):
    if pad_type == "valid":
        return ((0, 0), (0, 0))
    if pad_type == "custom":
        return ((custom[0], custom[1]), (custom[2], custom[3]))
    if pad_type in ("same", "same_lower"):
        return kernels.same_pads(tuple(size), tuple(kernel), tuple(strides), tuple(dilations),
                                 lower=pad_type == "same_lower")
    raise ModelError(f"op {op.name!r} ({op.type}) has unknown pad_type {pad_type!r}")


def _spatial(op: Op, key: str = "x") -> None:
    if op.rank(key) != 4:
        raise OPS.unsupported(op.type, op.name, f"{op.rank(key) - 2} spatial dimensions")


@OPS.register("conv")
def _conv(op: Op):
    _spatial(op)
    strides = ints(op.const("strides", (1, 1)))
    dilations = ints(op.const("dilations", (1, 1)))
    groups, pad_type = int(op.const("groups", 1)), str(op.const("pad_type", "valid"))
    custom = ints(op.const("pad", (0, 0, 0, 0)))
    if not op.is_const("weight") or (op.has("bias") and not op.is_const("bias")):
        op.not_batched()
    names = [op.var("x"), op.var("weight")] + ([op.var("bias")] if op.has("bias") else [])

    def run(args, owned):
        x, weight, bias = (*args, None)[:3]
        pads = _pads_2d(pad_type, x.shape[2:], weight.shape[2:], strides, dilations, custom, op)
        return kernels.conv2d(x, weight, bias, strides=strides, dilations=dilations, pads=pads,
                              groups=groups)
    return run, names


def _pool(kind: str):
    def build(op: Op):
        _spatial(op)
        kernel = ints(op.const("kernel_sizes"))
        strides = ints(op.const("strides", (1, 1)))
        pad_type, custom = str(op.const("pad_type")), ints(op.const("pad", (0, 0, 0, 0)))
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
        return of_one(op, run)
    return build


OPS.register("max_pool")(_pool("max"))
OPS.register("avg_pool")(_pool("avg"))


# No padding at all returns the input itself: a view, as far as the scheduler is concerned.
@OPS.register("pad", view=True)
def _pad(op: Op):
    pads = ints(op.const("pad"))
    mode, value = str(op.const("mode", "constant")), float(op.const("constant_val", 0.0))
    if mode not in ("constant", "reflect", "replicate"):
        raise OPS.unsupported(op.type, op.name, f"mode {mode!r}")
    count, rank = len(pads) // 2, op.rank("x")
    widths = [(0, 0)] * (rank - count) + [(pads[2 * i], pads[2 * i + 1]) for i in range(count)]
    if widths[0] != (0, 0):
        op.not_batched()
    return of_one(op, lambda x: kernels.pad(x, widths, mode, value))


@OPS.register("matmul")
def _matmul(op: Op):
    tx, ty = bool(op.const("transpose_x", False)), bool(op.const("transpose_y", False))
    names = [op.var("x"), op.var("y")]
    for key, name, transposed in (("x", names[0], tx), ("y", names[1], ty)):
        rank, const = op.rank(key), name in op.lowering.consts
        if (not const and (rank == 1 or (rank == 2 and (key == "y" or transposed)))
                or const and rank >= 3 and (op.shape(key)[0] != 1
                                            or rank > op.rank("y" if key == "x" else "x"))):
            op.not_batched()

    def run(args, owned):
        x, y = args
        if tx and x.ndim > 1:
            x = np.swapaxes(x, -1, -2)
        if ty and y.ndim > 1:
            y = np.swapaxes(y, -1, -2)
        return np.matmul(x, y)
    return run, names


@OPS.register("linear")
def _linear(op: Op):
    if op.rank("x") == 1:
        op.not_batched()
    weight = np.ascontiguousarray(np.asarray(op.const("weight")).T)
    bias = op.const("bias", None)

    def run(x):
        y = x @ weight
        return y if bias is None else y + bias
    return of_one(op, run)


@OPS.register("softmax")
def _softmax(op: Op):
    axis = int(op.const("axis", -1)) % op.rank("x")
    if axis == 0:
        op.not_batched()
    return of_one(op, lambda x: kernels.softmax(x, axis))
