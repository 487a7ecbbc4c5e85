"""NumPy kernels shared by the Core ML executors (NeuralNetwork and ML Program).

Core ML cannot run on Linux, so the verifier runs converted models through executors of the
documented layer/op semantics. Both executors compute in NCHW float32 with the batch of images
as the leading axis, and share these kernels so that a convolution, a pooling, a sigmoid or a
softmax means exactly one thing in both. Everything is vectorised over the whole batch:

- dense convolution is im2col (``sliding_window_view``) followed by one batched matmul, and a
  1x1 convolution is a plain matmul (BLAS does the work, on every core);
- depthwise convolution is a sum of kh*kw shifted multiply-adds over the batch;
- pooling is a max / sum over the kh*kw shifted views of a padded copy.

Padding follows TensorFlow and Core ML: "same" puts the odd extra cell at the end (bottom /
right) unless ``lower=True``; max pooling ignores padded cells; average pooling can count only
the real cells (``exclude_padding``) or every cell of the window.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ModelError

PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}
#: Floats of input + output per block of depthwise work: about a core's L2 cache (measured).
BLOCK_FLOATS = 1 << 16


def to_float32(value) -> np.ndarray:
    """A contiguous float32 ndarray of ``value`` (no copy when it already is one)."""
    return np.ascontiguousarray(value, dtype=np.float32)


def same_pads(size_hw, kernel_hw, strides, dilations=(1, 1), lower=False):
    """((top, bottom), (left, right)) of TF / Core ML "same" padding: output = ceil(in / stride).

    The odd extra cell goes at the end (bottom / right); ``lower=True`` (Core ML's
    SAME_LOWER / ONNX's same_lower) puts it first.
    """
    pads = []
    for size, kernel, stride, dilation in zip(size_hw, kernel_hw, strides, dilations):
        out = -(-int(size) // int(stride))
        effective = (int(kernel) - 1) * int(dilation) + 1
        total = max((out - 1) * int(stride) + effective - int(size), 0)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if lower else (small, big))
    return tuple(pads)


def pad(x, pads, mode="constant", value=0.0) -> np.ndarray:
    """Pad ``x`` by a (before, after) pair per axis; mode "constant", "reflect" or "replicate".

    "reflect" mirrors without repeating the edge (TF REFLECT, np.pad "reflect"); "replicate"
    repeats the edge value (np.pad "edge"; TF has no such mode).
    """
    x = np.asarray(x)
    pads = tuple((int(before), int(after)) for before, after in pads)
    if len(pads) != x.ndim:
        raise ModelError(f"padding needs {x.ndim} (before, after) pairs, got {len(pads)}")
    if any(before < 0 or after < 0 for before, after in pads):
        raise ModelError(f"negative padding {pads} is not supported")
    if mode not in PAD_MODES:
        raise ModelError(f"unknown padding mode {mode!r} (expected one of {sorted(PAD_MODES)})")
    if not any(before or after for before, after in pads):
        return x
    if mode != "constant":
        for (before, after), size in zip(pads, x.shape):
            if mode == "reflect" and max(before, after) >= size and (before or after):
                raise ModelError(f"reflection padding of {max(before, after)} needs an axis "
                                 f"longer than that, not {size}")
        return np.pad(x, pads, mode=PAD_MODES[mode])
    # Constant padding by assignment: several times faster than np.pad for large batches.
    shape = tuple(size + before + after for size, (before, after) in zip(x.shape, pads))
    out = np.full(shape, value, dtype=x.dtype)
    out[tuple(slice(before, before + size) for size, (before, _) in zip(x.shape, pads))] = x
    return out


def _out_size(size, kernel, stride, dilation):
    return (size - ((kernel - 1) * dilation + 1)) // stride + 1


def _shifted(xp, i, j, out_hw, strides, dilations):
    """The view of padded ``xp`` (N, C, H, W) that kernel tap (i, j) sees, over every output."""
    (oh, ow), (sh, sw), (dh, dw) = out_hw, strides, dilations
    return xp[:, :, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]


def conv2d(x, w, bias=None, strides=(1, 1), dilations=(1, 1), pads=((0, 0), (0, 0)),
           groups=1) -> np.ndarray:
    """Cross-correlation of x (N, Cin, H, W) with w (Cout, Cin // groups, kh, kw) → (N, Cout, ...).

    Zero padding ``pads`` ((top, bottom), (left, right)) is applied first; ``groups`` splits the
    input and output channels into that many independent convolutions (groups == Cin is a
    depthwise convolution, with Cout // Cin outputs per input channel).
    """
    x, w = to_float32(x), to_float32(w)
    cin = x.shape[1]
    cout, cin_g, kh, kw = w.shape
    groups = int(groups)
    if groups < 1 or cin % groups or cout % groups or cin // groups != cin_g:
        raise ModelError(f"convolution weights {w.shape} do not fit {cin} input channels in "
                         f"{groups} groups")
    strides = tuple(int(s) for s in strides)
    dilations = tuple(int(d) for d in dilations)
    xp = pad(x, ((0, 0), (0, 0), *pads))
    out_hw = (_out_size(xp.shape[2], kh, strides[0], dilations[0]),
              _out_size(xp.shape[3], kw, strides[1], dilations[1]))
    if min(out_hw) < 1:
        raise ModelError(f"a {kh}x{kw} convolution does not fit its {xp.shape[2:]} input")
    if cin_g == 1 and groups > 1:
        y = _depthwise(xp, w, out_hw, strides, dilations)
    elif groups == 1:
        y = _dense(xp, w, out_hw, strides, dilations)
    else:
        step_in, step_out = cin // groups, cout // groups
        y = np.concatenate([_dense(xp[:, g * step_in:(g + 1) * step_in],
                                   w[g * step_out:(g + 1) * step_out], out_hw, strides, dilations)
                            for g in range(groups)], axis=1)
    if bias is not None:
        y += to_float32(bias).reshape(1, cout, 1, 1)
    return y


def _dense(xp, w, out_hw, strides, dilations):
    """im2col + one matmul (per image, by numpy's batched matmul → BLAS gemm)."""
    n, cin = xp.shape[:2]
    cout, _, kh, kw = w.shape
    oh, ow = out_hw
    w2 = w.reshape(cout, cin * kh * kw)
    if kh == kw == 1:
        cols = _shifted(xp, 0, 0, out_hw, strides, dilations)
        cols = np.ascontiguousarray(cols).reshape(n, cin, oh * ow)
    else:
        (sh, sw), (dh, dw) = strides, dilations
        windows = np.lib.stride_tricks.sliding_window_view(
            xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        windows = windows[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, ::dh, ::dw]
        # (N, C, oh, ow, kh, kw) → (N, C, kh, kw, oh, ow): rows in the weights' (C, kh, kw) order.
        cols = windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, cin * kh * kw, oh * ow)
    return np.matmul(w2, cols).reshape(n, cout, oh, ow)


def _depthwise(xp, w, out_hw, strides, dilations):
    """Sum of kh*kw shifted multiply-adds; channel c feeds outputs c*m .. c*m+m-1.

    Memory-bound work: the (image, channel) planes go through in blocks small enough to stay
    in a core's cache while the kh*kw taps pass over them (about 3x faster than whole-batch
    passes on MobileNet's large early layers). Threads measured no faster on 2 cores.
    """
    cout, _, kh, kw = w.shape
    multiplier = cout // xp.shape[1]
    if multiplier > 1:
        xp = np.repeat(xp, multiplier, axis=1)
    n = xp.shape[0]
    planes = np.ascontiguousarray(xp).reshape(n * cout, 1, *xp.shape[2:])
    taps = np.tile(w.reshape(cout, kh * kw), (n, 1))  # one row of taps per plane
    y = np.empty((n * cout, 1, *out_hw), dtype=np.float32)
    block = max(1, BLOCK_FLOATS // (planes[0].size + 2 * y[0].size))
    scratch = np.empty((min(block, len(planes)), 1, *out_hw), dtype=np.float32)
    for start in range(0, len(planes), block):
        out, source = y[start:start + block], planes[start:start + block]
        spare = scratch[:len(out)]
        for k in range(kh * kw):
            view = _shifted(source, k // kw, k % kw, out_hw, strides, dilations)
            tap = taps[start:start + block, k].reshape(-1, 1, 1, 1)
            if k == 0:
                np.multiply(view, tap, out=out)
            else:
                np.multiply(view, tap, out=spare)
                out += spare
    return y.reshape(n, cout, *out_hw)


def pool2d(x, kind, kernel_hw, strides, pads, exclude_padding=True) -> np.ndarray:
    """Max or average pooling of x (N, C, H, W) over kernel_hw windows after padding ``pads``.

    Max pooling ignores padded cells. Average pooling divides by the number of real cells in
    each window when ``exclude_padding`` (TF's "SAME" average pooling, Core ML's
    avgPoolExcludePadding), else by kh*kw (padded cells count as zeros).
    """
    x = to_float32(x)
    if kind not in ("max", "avg"):
        raise ModelError(f"unknown pooling kind {kind!r} (expected 'max' or 'avg')")
    kh, kw = (int(k) for k in kernel_hw)
    strides = tuple(int(s) for s in strides)
    fill = -np.inf if kind == "max" else 0.0
    xp = pad(x, ((0, 0), (0, 0), *pads), value=fill)
    out_hw = (_out_size(xp.shape[2], kh, strides[0], 1), _out_size(xp.shape[3], kw, strides[1], 1))
    if min(out_hw) < 1:
        raise ModelError(f"a {kh}x{kw} pooling window does not fit its {xp.shape[2:]} input")
    y = None
    for i in range(kh):
        for j in range(kw):
            view = _shifted(xp, i, j, out_hw, strides, (1, 1))
            if y is None:
                y = view.copy()
            elif kind == "max":
                np.maximum(y, view, out=y)
            else:
                y += view
    if kind == "avg":
        if exclude_padding and any(before or after for before, after in pads):
            ones = pad(np.ones((1, 1, *x.shape[2:]), np.float32), ((0, 0), (0, 0), *pads))
            counts = pool2d(ones, "avg", (kh, kw), strides, ((0, 0), (0, 0)),
                            exclude_padding=False) * (kh * kw)
            y /= np.maximum(counts, 1.0)  # a window of padding only averages to 0
        else:
            y /= kh * kw
    return y


def sigmoid(x, out=None) -> np.ndarray:
    """1 / (1 + exp(-x)), into ``out`` when given (exp overflows to inf for very negative x:
    the result is then 0, as it should be)."""
    with np.errstate(over="ignore"):
        y = np.exp(np.negative(x, out=out), out=out)
    y += 1
    return np.reciprocal(y, out=y)


def softmax(x, axis) -> np.ndarray:
    """exp(x - max) / sum along ``axis`` (numerically stable), float32."""
    x = to_float32(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e
