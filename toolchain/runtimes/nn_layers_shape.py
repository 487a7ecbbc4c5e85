"""NeuralNetwork layers that move data without arithmetic: concatenations, transposes and
permutes, the reshape family (flatten, reshape, squeeze, expandDims, ...), slices, copies and
constants.

The legacy layers (``concat``, ``permute``, ``flatten``, ``reshape``) see rank-5 blobs
(Seq, Batch, C, H, W); the ND layers see the declared rank. Reshapes return views of their
input (registered ``view=True``, so the scheduler never lets a later step overwrite an array
that a view still shows). See ``nn_layers`` for the builder convention.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes.nn_layers import LAYERS, axis, reshaped


@LAYERS.register("concat")
def _concat(p, layer, weights):
    along = -5 if p.sequenceConcat else -3
    return lambda args, owned: np.concatenate(args, axis=along)


@LAYERS.register("concatND")
def _concat_nd(p, layer, weights):
    if p.interleave:
        raise LAYERS.unsupported("concatND", layer.name, "interleave")

    def run(args, owned):
        return np.concatenate(args, axis=axis(int(p.axis), args[0].ndim - 1, layer))
    return run


# An identity order leaves the (contiguous) input itself: a view, for the scheduler.
@LAYERS.register("transpose", view=True)
def _transpose(p, layer, weights):
    order = (0, *(int(a) + 1 for a in p.axes))

    def run(args, owned):
        if len(order) != args[0].ndim:
            raise ModelError(f"layer {layer.name!r}: {len(order) - 1} axes for rank "
                             f"{args[0].ndim - 1}")
        return np.ascontiguousarray(args[0].transpose(order))
    return run


@LAYERS.register("permute", view=True)
def _permute(p, layer, weights):
    axes = tuple(int(a) for a in p.axis) or (0, 1, 2, 3)
    dims = (1, 3, 4, 5)  # Seq, C, H, W of (images, Seq, Batch, C, H, W); Batch stays
    order = (0, dims[axes[0]], 2, *(dims[a] for a in axes[1:]))

    def run(args, owned):
        if args[0].ndim != 6:
            raise ModelError(f"layer {layer.name!r}: permute needs a rank-5 input")
        return np.ascontiguousarray(args[0].transpose(order))
    return run


@LAYERS.register("flatten", view=True)
def _flatten(p, layer, weights):
    def run(args, owned):
        x = args[0]
        if p.mode == 1:  # CHANNEL_LAST: H, W, C order
            x = np.ascontiguousarray(np.moveaxis(x, -3, -1))
        return x.reshape(*x.shape[:-3], -1, 1, 1)
    return run


@LAYERS.register("flattenTo2D", view=True)
def _flatten_to_2d(p, layer, weights):
    def run(args, owned):
        x = args[0]
        rank = x.ndim - 1
        at = int(p.axis) + rank if p.axis < 0 else int(p.axis)
        if not 0 <= at <= rank:
            raise ModelError(f"layer {layer.name!r}: axis {p.axis} for rank {rank}")
        shape = x.shape[1:]
        return reshaped(x, (int(np.prod(shape[:at])), int(np.prod(shape[at:]))), layer)
    return run


@LAYERS.register("reshapeStatic", view=True)
def _reshape_static(p, layer, weights):
    target = tuple(int(d) for d in p.targetShape)
    return lambda args, owned: reshaped(args[0], target, layer)


@LAYERS.register("rankPreservingReshape", view=True)
def _rank_preserving_reshape(p, layer, weights):
    def run(args, owned):
        shape = args[0].shape[1:]
        return reshaped(args[0], [s if t == 0 else t for s, t in zip(shape, p.targetShape)],
                        layer)
    return run


@LAYERS.register("reshape", view=True)
def _reshape(p, layer, weights):
    target = tuple(int(d) for d in p.targetShape)
    if len(target) not in (3, 4):
        raise ModelError(f"layer {layer.name!r}: reshape target {target} is not 3 or 4 long")

    def run(args, owned):
        x = args[0]  # (images, Seq, Batch, C, H, W)
        if x.ndim != 6:
            raise ModelError(f"layer {layer.name!r}: reshape needs a rank-5 input")
        seq = x.shape[1] if len(target) == 3 else target[0]
        c, h, w = target[-3:]
        if p.mode == 1:  # CHANNEL_LAST: flatten as H, W, C and read back as H, W, C
            x = np.ascontiguousarray(np.moveaxis(x, 3, 5))
            y = reshaped(x, (seq, x.shape[2], h, w, c), layer)
            return np.ascontiguousarray(np.moveaxis(y, 5, 3))
        return reshaped(x, (seq, x.shape[2], c, h, w), layer)
    return run


@LAYERS.register("squeeze", view=True)
def _squeeze(p, layer, weights):
    def run(args, owned):
        x = args[0]
        shape = x.shape[1:]
        if p.squeezeAll:
            drop = {i for i, size in enumerate(shape) if size == 1}
        else:
            drop = {axis(int(a), len(shape), layer) - 1 for a in p.axes}
            if any(shape[i] != 1 for i in drop):
                raise ModelError(f"layer {layer.name!r} cannot squeeze axes {sorted(drop)} "
                                 f"of shape {shape}")
        kept = [size for i, size in enumerate(shape) if i not in drop]
        return x.reshape(len(x), *(kept or [1]))
    return run


@LAYERS.register("expandDims", view=True)
def _expand_dims(p, layer, weights):
    def run(args, owned):
        x = args[0]
        rank = x.ndim - 1 + len(p.axes)
        new = {axis(int(a), rank, layer) - 1 for a in p.axes}
        sizes = iter(x.shape[1:])
        return x.reshape(len(x), *(1 if i in new else next(sizes) for i in range(rank)))
    return run


@LAYERS.register("copy")
def _copy(p, layer, weights):
    return lambda args, owned: args[0].copy()


@LAYERS.register("sliceStatic", view=True)
def _slice_static(p, layer, weights):
    def run(args, owned):
        x = args[0]
        index = [slice(None)]
        for i in range(x.ndim - 1):
            begin = None if p.beginMasks[i] else int(p.beginIds[i])
            end = None if p.endMasks[i] else int(p.endIds[i])
            index.append(slice(begin, end, int(p.strides[i]) if len(p.strides) else 1))
        y = x[tuple(index)]
        squeeze = [i for i, flag in enumerate(p.squeezeMasks) if flag]
        if squeeze:  # drop those (now length-1) axes, keeping at least rank 1
            kept = [size for i, size in enumerate(y.shape[1:]) if i not in squeeze]
            y = reshaped(y, kept or [1], layer)
        return y
    return run


@LAYERS.register("loadConstantND")
def _load_constant_nd(p, layer, weights):
    shape = tuple(int(d) for d in p.shape)
    data = weights(p.data, shape, "data")[None]  # one copy, broadcast against the images
    return lambda args, owned: data.copy()
