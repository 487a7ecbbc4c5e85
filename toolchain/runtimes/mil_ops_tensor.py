"""ML Program ops that shape or supply tensors: concat, transpose, reshape, squeeze,
expand_dims, classify, and the constants (``const``, the ``constexpr_*`` weight decoders of
iOS 16-18, ``dequantize``).

Constants are steps without runtime inputs, computed once at load time (constant folding), so
float16 and int8 weights are float32 arrays before the first image arrives. The shape ops keep
the batch axis where they can and return views (registered ``view=True``). See ``mil_ops`` for
the builder convention.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes.mil_ops import OPS, Op, ints, of_one, sorted_axes


@OPS.register("concat")
def _concat(op: Op):
    names = op.vars("values")
    rank = len(op.lowering.shapes[names[0]])
    axis, interleave = int(op.const("axis")) % rank, bool(op.const("interleave", False))
    if axis == 0 or any(name in op.lowering.consts for name in names):
        op.not_batched()

    def run(values, owned):
        if not interleave:
            return np.concatenate(values, axis=axis)
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return run, names


@OPS.register("transpose", view=True)
def _transpose(op: Op):
    perm = ints(op.const("perm"))
    if perm and perm[0] % len(perm) != 0:
        op.not_batched()
    return of_one(op, lambda x: np.transpose(x, perm))


@OPS.register("reshape", view=True)
def _reshape(op: Op):
    shape, declared = list(ints(op.const("shape"))), op.shape("x")
    if 0 in shape and len(shape) == len(declared):
        shape = [d if s == 0 else s for s, d in zip(shape, declared)]
    if not declared or not shape or shape[0] != declared[0] or None in declared:
        op.not_batched()

    def run(x):  # a reshape that keeps the batch axis keeps it for any batch size
        return x.reshape([x.shape[0], *shape[1:]] if shape[0] == declared[0] else shape)
    return of_one(op, run)


@OPS.register("squeeze", view=True)
def _squeeze(op: Op):
    declared = op.shape("x")
    axes = op.const("axes", None)
    axes = (tuple(i for i, d in enumerate(declared) if d == 1) if axes is None
            else sorted_axes(axes, len(declared)))
    if 0 in axes:
        op.not_batched()
    return of_one(op, lambda x: np.squeeze(x, axis=axes))


@OPS.register("expand_dims", view=True)
def _expand_dims(op: Op):
    values = ints(op.const("axes"))
    axes = sorted_axes(values, op.rank("x") + len(values))
    if 0 in axes:
        op.not_batched()
    return of_one(op, lambda x: np.expand_dims(x, axes))


@OPS.register("classify", view=True)
def _classify(op: Op):
    classes = op.const("classes")
    classes = [classes] if not isinstance(classes, list) else classes
    labels = tuple(str(np.asarray(c).reshape(-1)[0]) if not isinstance(c, str) else c
                   for c in classes)
    op.lowering.labels = labels
    if op.rank("probabilities") < 2:
        op.not_batched()

    def run(probabilities):
        rows = probabilities.reshape(-1, len(labels)) if probabilities.ndim < 2 else (
            probabilities.reshape(probabilities.shape[0], -1))
        if rows.shape[1] != len(labels):
            raise ModelError(f"classify got {rows.shape[1]} probabilities for "
                             f"{len(labels)} classes")
        return np.array(labels, dtype=object)[np.argmax(rows, axis=1)], rows
    return of_one(op, run, "probabilities")


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


@OPS.register("dequantize")
def _dequantize(op: Op):
    """iOS 17 ``dequantize``: the same arithmetic on a (usually constant) int8 tensor."""
    scale, zero = op.const("scale"), op.const("zero_point", 0)
    axis = int(op.const("axis", 0))
    if np.ndim(scale) and axis % op.rank("input") == 0:
        op.not_batched()
    return of_one(op, lambda x: _affine(x, scale, zero, axis), "input")


def _constant(compute):
    """A builder for an op whose value ``compute(op)`` is known at load time: a step without
    inputs (folded at once), its float values in float32."""
    def build(op: Op):
        value = compute(op)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = value.astype(np.float32)
        return (lambda args, owned: value), []
    return build


def _affine_dequantize(op: Op) -> np.ndarray:
    """iOS 16 ``constexpr_affine_dequantize`` (what linear_quantize_weights writes for iOS 16)."""
    return _affine(op.const("quantized_data"), op.const("scale"), op.const("zero_point"),
                   int(op.const("axis")))


def _blockwise_shift_scale(op: Op) -> np.ndarray:
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


OPS.register("const")(_constant(lambda op: op.const("val")))
OPS.register("constexpr_affine_dequantize")(_constant(_affine_dequantize))
OPS.register("constexpr_blockwise_shift_scale")(_constant(_blockwise_shift_scale))
OPS.register("constexpr_cast")(_constant(lambda op: np.asarray(op.const("source_val"),
                                                                 np.float32)))
