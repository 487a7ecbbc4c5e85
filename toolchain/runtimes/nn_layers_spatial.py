"""NeuralNetwork layers over images: convolution, pooling, padding, and the per-channel
batchnorm / scale / bias, with the padding rules of NeuralNetwork.proto.

The convolution and pooling arithmetic is ``kernels``' (shared with the ML Program executor);
this module maps the layers' parameters onto it: valid padding with explicit border amounts,
same padding (BOTTOM_RIGHT_HEAVY or TOP_LEFT_HEAVY), global pooling, and pooling's
``includeLastPixel`` (Caffe's ValidCompletePadding). Leading per-example axes beyond
(C, H, W) are all batch. See ``nn_layers`` for the builder convention.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError
from toolchain.runtimes import kernels
from toolchain.runtimes.nn_layers import LAYERS
from toolchain.runtimes.plan import writable


def _spatial(fn):
    """Run fn on x viewed as (-1, C, H, W): leading per-example axes are all batch."""
    def run(x):
        y = fn(x.reshape(-1, *x.shape[-3:]))
        return y.reshape(*x.shape[:-3], *y.shape[1:])
    return run


def _padding_rule(padding_kind, params, kernel, strides, dilations):
    """pads(size_hw) for a convolution's / pooling's valid or same padding."""
    if padding_kind == "same":
        lower = params.same.asymmetryMode == 1  # TOP_LEFT_HEAVY
        return lambda size: kernels.same_pads(size, kernel, strides, dilations, lower)
    amounts = params.valid.paddingAmounts.borderAmounts if padding_kind == "valid" else []
    pads = tuple((int(a.startEdgeSize), int(a.endEdgeSize)) for a in amounts) or ((0, 0), (0, 0))
    return lambda size: pads


def _pair(values, default):
    values = tuple(int(v) for v in values)
    return values if len(values) == 2 else default


@LAYERS.register("convolution")
def _convolution(p, layer, weights):
    if p.isDeconvolution:
        raise LAYERS.unsupported("convolution", layer.name, "deconvolution")
    kernel = _pair(p.kernelSize, (3, 3))
    strides, dilations = _pair(p.stride, (1, 1)), _pair(p.dilationFactor, (1, 1))
    groups = int(p.nGroups) or 1
    w = weights(p.weights, (int(p.outputChannels), int(p.kernelChannels), *kernel))
    b = weights(p.bias, (int(p.outputChannels),), "bias") if p.hasBias else None
    pads = _padding_rule(p.WhichOneof("ConvolutionPaddingType"), p, kernel, strides, dilations)
    conv = _spatial(lambda x: kernels.conv2d(x, w, b, strides, dilations, pads(x.shape[2:]),
                                             groups))
    return lambda args, owned: conv(args[0])


@LAYERS.register("pooling")
def _pooling(p, layer, weights):
    kind = {0: "max", 1: "avg"}.get(p.type)
    if kind is None:
        raise LAYERS.unsupported("pooling", layer.name, "L2 pooling")
    kernel, strides = _pair(p.kernelSize, (3, 3)), _pair(p.stride, (1, 1))
    exclude, padding = p.avgPoolExcludePadding, p.WhichOneof("PoolingPaddingType")
    pads = _padding_rule(padding, p, kernel, strides, (1, 1))

    def pool(x):
        if p.globalPooling:
            return (x.max(axis=(2, 3), keepdims=True) if kind == "max"
                    else x.mean(axis=(2, 3), keepdims=True, dtype=np.float32))
        if padding == "includeLastPixel":
            return _pool_include_last_pixel(x, kind, kernel, strides, exclude,
                                            _pair(p.includeLastPixel.paddingAmounts, (0, 0)))
        return kernels.pool2d(x, kind, kernel, strides, pads(x.shape[2:]), exclude)

    pool = _spatial(pool)
    return lambda args, owned: pool(args[0])


def _pool_include_last_pixel(x, kind, kernel, strides, exclude, padding):
    """ValidCompletePadding: symmetric padding, and a last window that may hang over the end."""
    sizes, extra = [], []
    for size, k, s, p in zip(x.shape[2:], kernel, strides, padding):
        out = -(-(size + 2 * p - k) // s) + 1
        if any(padding) and (out - 1) * s >= size + p:
            out -= 1
        sizes.append(out)
        extra.append(max(0, (out - 1) * s + k - (size + 2 * p)))
    (ph, pw), (eh, ew) = padding, extra
    if kind == "avg" and not exclude:  # the symmetric padding counts, the overhang does not
        x = kernels.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        y = kernels.pool2d(x, "avg", kernel, strides, ((0, eh), (0, ew)), True)
    else:
        y = kernels.pool2d(x, kind, kernel, strides, ((ph, ph + eh), (pw, pw + ew)), True)
    return y[:, :, :sizes[0], :sizes[1]]


# No padding at all returns the input itself: a view, as far as the scheduler is concerned.
@LAYERS.register("padding", view=True)
def _padding(p, layer, weights):
    mode = {"constant": "constant", "reflection": "reflect", "replication": "replicate"}.get(
        p.WhichOneof("PaddingType"), "constant")
    amounts = tuple((int(a.startEdgeSize), int(a.endEdgeSize))
                    for a in p.paddingAmounts.borderAmounts) or ((0, 0), (0, 0))
    if len(amounts) != 2:
        raise ModelError(f"layer {layer.name!r}: padding needs [H, W] amounts, got {amounts}")
    value = p.constant.value

    def run(args, owned):
        x = args[0]
        return kernels.pad(x, ((0, 0),) * (x.ndim - 2) + amounts, mode, value)
    return run


@LAYERS.register("batchnorm")
def _batchnorm(p, layer, weights):
    if p.computeMeanVar:
        raise LAYERS.unsupported("batchnorm", layer.name, "computeMeanVar")
    c = (int(p.channels),)
    gamma, beta = weights(p.gamma, c, "gamma"), weights(p.beta, c, "beta")
    mean, variance = weights(p.mean, c, "mean"), weights(p.variance, c, "variance")
    scale = gamma / np.sqrt(variance + np.float32(p.epsilon or 1e-5))
    shift = (beta - mean * scale).reshape(-1, 1, 1)
    scale = scale.reshape(-1, 1, 1)

    def run(args, owned):
        y = np.multiply(args[0], scale, out=writable(args[:1], owned))
        y += shift
        return y
    return run


def _chw(shape):
    """A scale / bias parameter of shape [1], [C], [1, H, W] or [C, H, W] → broadcastable."""
    shape = tuple(int(d) for d in shape) or (1,)
    return shape, (shape[0], 1, 1) if len(shape) == 1 else shape


@LAYERS.register("scale")
def _scale(p, layer, weights):
    stored, shape = _chw(p.shapeScale)
    scale = weights(p.scale, stored, "scale").reshape(shape)
    bias = None
    if p.hasBias:
        stored, shape = _chw(p.shapeBias)
        bias = weights(p.bias, stored, "bias").reshape(shape)

    def run(args, owned):
        y = args[0] * scale
        if bias is not None:
            y += bias
        return y
    return run


@LAYERS.register("bias")
def _bias(p, layer, weights):
    stored, shape = _chw(p.shape)
    bias = weights(p.bias, stored, "bias").reshape(shape)
    return lambda args, owned: args[0] + bias
