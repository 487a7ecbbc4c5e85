"""A NumPy executor for Core ML NeuralNetwork models (``.mlmodel``), for Linux.

Core ML cannot run on Linux, yet every converted model must be verified. This executor runs a
NeuralNetwork (classifier) spec layer by layer with the semantics of NeuralNetwork.proto: the
image preprocessing the model does itself (colour order, channel scale, per-channel bias or mean
image), every layer coremltools emits for our backbones (and the cheap relatives of each), and
the classifier's probability output. A layer it does not implement is an UnsupportedLayer error
naming the layer, at load time: nothing is ever skipped.

Batches: Core ML predicts a batch image by image. Each blob here holds N per-image tensors
stacked on a new leading axis, so blob ``(N, *shape)`` is N images of Core ML's ``shape``
(``[1, 3, H, W]`` for an image with rank-4 mapping). Per-image axes are shifted by one and no
layer ever mixes images, so batch results equal one-by-one results, at NumPy/BLAS speed.

``compute_precision="float16"`` rounds the weights and every layer's output to float16, which
approximates the GPU / Neural Engine; "float32" matches Core ML's CPU path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import ModelError, UnsupportedLayer
from toolchain.runtimes import check_precision, kernels

#: Images per internal forward pass: bounds memory, keeps activations closer to the caches.
CHUNK = 16
NETWORK_KINDS = ("neuralNetworkClassifier", "neuralNetwork", "neuralNetworkRegressor")


class Executor:
    """Runs one NeuralNetwork spec; see the module docstring for the batch convention."""

    def __init__(self, spec, path, compute_precision: str = "float32") -> None:
        self.path = Path(path)
        self.compute_precision = check_precision(compute_precision)
        kind = spec.WhichOneof("Type")
        if kind not in NETWORK_KINDS:
            raise ModelError(f"{self.path.name} is a Core ML {kind} model, not a neural network")
        network = getattr(spec, kind)
        self.description = spec.description
        self.classifier = kind == "neuralNetworkClassifier"
        self.labels = _labels(network) if self.classifier else ()
        rounding = to_float16 if compute_precision == "float16" else None
        self._image_rank5 = network.imageInputShapeMapping == 0
        self._array_rank5 = network.arrayInputShapeMapping == 0
        self._preprocessing = {p.featureName: p for p in network.preprocessing}
        self._inputs = {feature.name: feature.type for feature in spec.description.input}
        images = [name for name, t in self._inputs.items() if t.WhichOneof("Type") == "imageType"]
        self.input_name = images[0] if images else next(iter(self._inputs), "")
        image = self._inputs[images[0]].imageType if images else None
        self.input_size = int(image.width) if image is not None else None
        self._image_hw = (int(image.height), int(image.width)) if image is not None else None
        self.color = _color(image, self.path) if image is not None else None
        self._outputs = [feature.name for feature in spec.description.output]
        self._probs_blob = ""
        if self.classifier:
            self._probs_blob = (network.labelProbabilityLayerName
                                or (network.layers[-1].output[0] if network.layers else ""))
        keep = set(self._outputs) | {self._probs_blob}
        self._graph = _Graph(network.layers, keep, rounding)
        self._round = rounding or (lambda array: array)

    # -- public API --------------------------------------------------------------------------

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, size, size, 3) → float32 probabilities (N, len(labels))."""
        if not self.classifier:
            raise ModelError(f"{self.path.name} is not a classifier; use run() for its outputs")
        if self._image_hw is None:
            raise ModelError(f"{self.path.name} takes no image input")
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (*self._image_hw, 3):
            raise ModelError(f"{self.path.name} takes images of shape "
                             f"(N, {self._image_hw[0]}, {self._image_hw[1]}, 3), "
                             f"not {pixels.shape}")
        rows = [self._probabilities(self._forward({self.input_name: pixels[i:i + CHUNK]}))
                for i in range(0, len(pixels), CHUNK)]
        if not rows:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.concatenate(rows, axis=0)

    def run(self, inputs: dict) -> dict:
        """Every output of the model description, for N examples at once.

        Image inputs take RGB pixels (N, H, W, 3) (or (N, H, W) for grayscale models); array
        inputs take N stacked arrays of the declared shape on a new leading axis, or (when the
        declared shape starts with a batch of 1) the declared rank with N in that first place.
        Outputs come back the same way: axis 0 holds the N examples, and a per-example leading
        axis of size 1 (Core ML's batch of one) is folded into it. The classifier's probability
        output is an array (N, len(labels)) in ``labels`` order, its label output an array of
        label strings.
        """
        missing = set(self._inputs) - set(inputs)
        if missing:
            raise ModelError(f"{self.path.name} needs inputs {sorted(missing)}")
        blobs = self._forward(inputs)
        results = {}
        for name in self._outputs:
            if self.classifier and name == self.description.predictedProbabilitiesName:
                results[name] = self._probabilities(blobs)
            elif self.classifier and name == self.description.predictedFeatureName:
                probs = self._probabilities(blobs)
                results[name] = np.asarray([self.labels[i] for i in probs.argmax(axis=1)])
            elif name in blobs:
                blob = blobs[name]
                results[name] = (blob.reshape(blob.shape[0], *blob.shape[2:])
                                 if blob.ndim > 1 and blob.shape[1] == 1 else blob)
            else:
                raise ModelError(f"no layer of {self.path.name} produces output {name!r}")
        return results

    # -- internals ---------------------------------------------------------------------------

    def _forward(self, inputs: dict) -> dict:
        feeds = {name: self._round(self._feed(name, value)) for name, value in inputs.items()
                 if name in self._inputs}
        return self._graph.run(feeds)

    def _feed(self, name: str, value) -> np.ndarray:
        """One input as a blob: (N, *Core ML's per-example shape), float32, owned."""
        feature = self._inputs[name]
        if feature.WhichOneof("Type") == "imageType":
            x = self._image(name, np.asarray(value))
            return x[:, None, None] if self._image_rank5 else x[:, None]
        if feature.WhichOneof("Type") != "multiArrayType":
            raise ModelError(f"input {name!r} is neither an image nor a multi-array")
        x = np.array(value, dtype=np.float32)  # a copy: layers may work in place
        declared = tuple(int(d) for d in feature.multiArrayType.shape)
        if self._array_rank5:
            # Rank-5 mapping: [C] → [1, 1, C, 1, 1], [C, H, W] → [1, 1, C, H, W].
            per = x.shape[1:]
            shape = (per[0], 1, 1) if len(per) == 1 else tuple(per)
            if len(shape) != 3:
                raise ModelError(f"input {name!r} must be (N, C) or (N, C, H, W), not {x.shape}")
            return x.reshape(x.shape[0], 1, 1, *shape)
        if declared and x.ndim == len(declared) and declared[0] == 1:
            return x.reshape(x.shape[0], 1, *x.shape[1:])
        return x

    def _image(self, name: str, pixels: np.ndarray) -> np.ndarray:
        """Core ML's image preprocessing: colour order, then scale * x + bias (or - mean)."""
        gray = self.color == "GRAY"
        x = pixels.astype(np.float32)
        if gray:
            if x.ndim == 4 and x.shape[-1] == 3:  # RGB → L as PIL's convert("L") does
                x = x @ np.float32([0.299, 0.587, 0.114])
            x = x.reshape(x.shape[0], 1, *x.shape[1:3])
        else:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ModelError(f"image input {name!r} takes (N, H, W, 3) RGB pixels, "
                                 f"not {x.shape}")
            if self.color == "BGR":
                x = x[..., ::-1]
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        entry = self._preprocessing.get(name)
        kind = entry.WhichOneof("preprocessor") if entry is not None else None
        if kind == "scaler":
            s = entry.scaler
            bias = ([s.grayBias] if gray else
                    [s.blueBias, s.greenBias, s.redBias] if self.color == "BGR" else
                    [s.redBias, s.greenBias, s.blueBias])
            x *= np.float32(s.channelScale)
            x += np.float32(bias).reshape(1, -1, 1, 1)
        elif kind == "meanImage":
            mean = kernels.to_float32(entry.meanImage.meanImage)
            if mean.size != x[0].size:
                raise ModelError(f"mean image of {mean.size} values for a {x.shape[1:]} image")
            x -= mean.reshape(1, *x.shape[1:])
        return x

    def _probabilities(self, blobs: dict) -> np.ndarray:
        if self._probs_blob not in blobs:
            raise ModelError(f"no layer of {self.path.name} produces the probabilities "
                             f"{self._probs_blob!r}")
        probs = blobs[self._probs_blob]
        probs = probs.reshape(probs.shape[0], -1)
        if probs.shape[1] != len(self.labels):
            raise ModelError(f"{self.path.name} produced {probs.shape[1]} probabilities for "
                             f"{len(self.labels)} labels")
        return kernels.to_float32(probs)


def _color(image, path: Path) -> str:
    """"RGB", "BGR" or "GRAY": the channel order the model's image input arrives in."""
    spaces = {image.RGB: "RGB", image.BGR: "BGR", image.GRAYSCALE: "GRAY",
              image.GRAYSCALE_FLOAT16: "GRAY"}
    if image.colorSpace not in spaces:
        raise ModelError(f"{path.name}: image input with unknown colour space {image.colorSpace}")
    return spaces[image.colorSpace]


def _labels(network) -> tuple[str, ...]:
    kind = network.WhichOneof("ClassLabels")
    if kind == "stringClassLabels":
        return tuple(network.stringClassLabels.vector)
    if kind == "int64ClassLabels":
        return tuple(str(v) for v in network.int64ClassLabels.vector)
    raise ModelError("the NeuralNetwork classifier has no class labels")



# -- the layer graph ---------------------------------------------------------------------------


def to_float16(array: np.ndarray) -> np.ndarray:
    """``array`` rounded to float16 and back: float16 compute, emulated."""
    return np.asarray(array, np.float32).astype(np.float16).astype(np.float32)


class _Step:
    __slots__ = ("fn", "inputs", "name", "outputs", "ownable", "release")

    def __init__(self, name, inputs, outputs, fn) -> None:
        self.name, self.inputs, self.outputs, self.fn = name, inputs, outputs, fn
        self.ownable, self.release = [False] * len(inputs), []


class _Graph:
    """The compiled layer list: weights decoded once, blobs freed after their last reader.

    A layer may overwrite an input in place when no later layer reads that blob (or a view of
    it) and it is not a model output: most activations then cost one pass and no allocation.
    """

    def __init__(self, layers, keep: set, rounding) -> None:
        self.rounding = rounding
        self.steps, roots = [], {}
        for layer in layers:
            kind = layer.WhichOneof("layer")
            build = _BUILDERS.get(kind)
            if build is None:
                raise _unsupported(layer, kind)
            fn, view = build(getattr(layer, kind), layer, _Weights(layer, rounding))
            step = _Step(layer.name, list(layer.input), list(layer.output), fn)
            self.steps.append(step)
            for name in step.outputs:
                roots[name] = roots.get(step.inputs[0], step.inputs[0]) if view else name
        last_use, protected = {}, {roots.get(name, name) for name in keep}
        for index, step in enumerate(self.steps):
            for name in step.inputs:
                last_use[roots.get(name, name)] = index
                last_use[name] = index
            for name in step.outputs:
                last_use.setdefault(name, index)
        for index, step in enumerate(self.steps):
            for i, name in enumerate(step.inputs):
                root = roots.get(name, name)
                step.ownable[i] = (last_use[root] == index and root not in protected
                                   and sum(roots.get(n, n) == root for n in step.inputs) == 1)
            step.release = [name for name in {*step.inputs, *step.outputs}
                            if last_use.get(name) == index and name not in keep]

    def run(self, feeds: dict) -> dict:
        blobs = dict(feeds)
        for step in self.steps:
            try:
                args = [blobs[name] for name in step.inputs]
            except KeyError as missing:
                raise ModelError(f"layer {step.name!r} reads {missing.args[0]!r}, which no input "
                                 f"or earlier layer produces") from None
            outputs = step.fn(args, step.ownable)
            for name, value in zip(step.outputs, outputs):
                blobs[name] = self.rounding(value) if self.rounding else value
            for name in step.release:
                blobs.pop(name, None)
        return blobs


def _unsupported(layer, kind, detail: str = "") -> UnsupportedLayer:
    what = f"layer type {kind!r}" + (f" with {detail}" if detail else "")
    return UnsupportedLayer(f"the NumPy Core ML executor does not implement {what} "
                            f"(layer {layer.name!r})")


class _Weights:
    """Decodes a layer's WeightParams: float32, float16, or 1-8 bit linear / LUT quantized."""

    def __init__(self, layer, rounding) -> None:
        self.layer, self.rounding = layer, rounding

    def __call__(self, params, shape, what: str = "weights") -> np.ndarray:
        count = int(np.prod(shape))
        if len(params.floatValue):
            # A slice is one list copy; iterating the pure-Python protobuf field is ~3x slower.
            values = np.array(params.floatValue[:], dtype=np.float32)
        elif len(params.float16Value):
            values = np.frombuffer(params.float16Value, dtype="<f2").astype(np.float32)
        elif len(params.rawValue):
            values = self._dequantize(params, count, what)
        else:
            raise ModelError(f"layer {self.layer.name!r} has no {what}")
        if values.size != count:
            raise ModelError(f"layer {self.layer.name!r} has {values.size} {what}, "
                             f"expected {count} for shape {tuple(shape)}")
        values = values.reshape(shape)
        return self.rounding(values) if self.rounding else values

    def _dequantize(self, params, count: int, what: str) -> np.ndarray:
        quantization = params.quantization
        kind, bits = quantization.WhichOneof("QuantizationType"), int(quantization.numberOfBits)
        if kind is None or not 1 <= bits <= 8:
            raise _unsupported(self.layer, self.layer.WhichOneof("layer"),
                               f"{what} stored as raw bytes without 1-8 bit quantization")
        codes = np.frombuffer(params.rawValue, dtype=np.uint8)
        if bits < 8:  # coremltools packs codes most significant bit first
            bits_array = np.unpackbits(codes)[:count * bits].reshape(-1, bits)
            codes = bits_array @ (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)
        codes = codes[:count]
        if kind == "lookupTableQuantization":
            table = np.float32(quantization.lookupTableQuantization.floatValue)
            if table.size < 2 ** bits:
                raise ModelError(f"layer {self.layer.name!r}: lookup table of {table.size} "
                                 f"values for {bits}-bit {what}")
            return table[codes]
        linear = quantization.linearQuantization
        scale, bias = np.float32(linear.scale), np.float32(linear.bias)
        if scale.size != bias.size or scale.size == 0 or count % scale.size:
            raise ModelError(f"layer {self.layer.name!r}: {scale.size} scales and {bias.size} "
                             f"biases do not fit {count} {what}")
        codes = codes.astype(np.float32).reshape(scale.size, -1)  # one row per output channel
        return (codes * scale[:, None] + bias[:, None]).reshape(-1)


# -- layer builders: each returns (fn(args, ownable) -> [outputs], output-is-a-view-of-input) --

_BUILDERS = {}


def _builder(*kinds):
    def register(function):
        for kind in kinds:
            _BUILDERS[kind] = function
        return function
    return register


def _axis(axis: int, rank: int, layer) -> int:
    """A per-example axis (negative allowed) → the blob's axis (one more: images come first)."""
    resolved = axis + rank if axis < 0 else axis
    if not 0 <= resolved < rank:
        raise ModelError(f"layer {layer.name!r}: axis {axis} is out of range for rank {rank}")
    return resolved + 1


def _align(arrays):
    """Insert unit axes after the image axis so that per-example shapes broadcast as in Core ML
    (right-aligned), while image i only ever meets image i."""
    rank = max(a.ndim for a in arrays)
    return [a.reshape(a.shape[0], *(1,) * (rank - a.ndim), *a.shape[1:]) for a in arrays]


def _out(x: np.ndarray, owned: bool):
    return x if owned else None


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


@_builder("convolution")
def _convolution(p, layer, weights):
    if p.isDeconvolution:
        raise _unsupported(layer, "convolution", "isDeconvolution (deconvolution)")
    kernel = _pair(p.kernelSize, (3, 3))
    strides, dilations = _pair(p.stride, (1, 1)), _pair(p.dilationFactor, (1, 1))
    groups = int(p.nGroups) or 1
    w = weights(p.weights, (int(p.outputChannels), int(p.kernelChannels), *kernel))
    b = weights(p.bias, (int(p.outputChannels),), "bias") if p.hasBias else None
    pads = _padding_rule(p.WhichOneof("ConvolutionPaddingType"), p, kernel, strides, dilations)
    conv = _spatial(lambda x: kernels.conv2d(x, w, b, strides, dilations, pads(x.shape[2:]),
                                             groups))
    return (lambda args, owned: [conv(args[0])]), False


@_builder("pooling")
def _pooling(p, layer, weights):
    kind = {0: "max", 1: "avg"}.get(p.type)
    if kind is None:
        raise _unsupported(layer, "pooling", "L2 pooling")
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
    return (lambda args, owned: [pool(args[0])]), False


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


@_builder("padding")
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
        return [kernels.pad(x, ((0, 0),) * (x.ndim - 2) + amounts, mode, value)]
    return run, False


def _channel_vector(values, x):
    """A per-channel (axis -3) parameter of length C or 1, broadcastable against x."""
    return values.reshape(-1, 1, 1) if x.ndim >= 3 else values


def _softplus(x):
    return np.logaddexp(np.float32(0), x).astype(np.float32)


def _sigmoid(x, out=None):
    with np.errstate(over="ignore"):
        y = np.exp(np.negative(x, out=out), out=out)
    y += 1
    return np.reciprocal(y, out=y)


@_builder("activation")
def _activation(p, layer, weights):
    kind = p.WhichOneof("NonlinearityType")
    a = getattr(p, kind) if kind else None
    if kind == "ReLU":
        return (lambda args, owned: [np.maximum(args[0], 0, out=_out(args[0], owned[0]))]), False
    if kind == "linear":
        alpha, beta = np.float32(a.alpha), np.float32(a.beta)

        def linear(args, owned):
            y = np.multiply(args[0], alpha, out=_out(args[0], owned[0]))
            if beta:
                y += beta
            return [y]
        return linear, False
    if kind in ("PReLU", "parametricSoftplus"):
        count = max(len(a.alpha.floatValue), len(a.alpha.float16Value), 1)
        alpha = weights(a.alpha, (count,), "alpha")
        beta = weights(a.beta, (count,), "beta") if kind == "parametricSoftplus" else None
    simple = {
        "leakyReLU": lambda x: np.where(x >= 0, x, np.float32(a.alpha) * x),
        "thresholdedReLU": lambda x: np.where(x >= np.float32(a.alpha), x, np.float32(0)),
        "tanh": np.tanh,
        "scaledTanh": lambda x: np.float32(a.alpha) * np.tanh(np.float32(a.beta) * x),
        "sigmoid": _sigmoid,
        "sigmoidHard": lambda x: np.clip(np.float32(a.alpha) * x + np.float32(a.beta), 0, 1),
        "ELU": lambda x: np.where(x >= 0, x, np.float32(a.alpha) * np.expm1(np.minimum(x, 0))),
        "softsign": lambda x: x / (1 + np.abs(x)),
        "softplus": _softplus,
        "PReLU": lambda x: np.where(x >= 0, x, _channel_vector(alpha, x) * x),
        "parametricSoftplus": lambda x: (_channel_vector(alpha, x)
                                         * _softplus(_channel_vector(beta, x) * x)),
    }.get(kind)
    if simple is None:
        raise _unsupported(layer, "activation", f"{kind or 'no'} nonlinearity")
    return (lambda args, owned: [kernels.to_float32(simple(args[0]))]), False


@_builder("unary")
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
        raise _unsupported(layer, "unary", f"operation {p.type}")

    def unary(args, owned):
        x, out = args[0], _out(args[0], owned[0])
        if scale != 1 or shift != 0:
            x = out = np.multiply(x, scale, out=out)
            x += shift
        with np.errstate(divide="ignore", invalid="ignore"):
            return [op(x, out)]
    return unary, False


def _combine(args, owned, ufunc):
    """Fold a commutative ufunc over the inputs, in place into an owned full-size input."""
    arrays = _align(args)
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    target = next((i for i, a in enumerate(arrays) if owned[i] and a.shape == shape), None)
    if target is None:
        result, rest = ufunc(arrays[0], arrays[1]), arrays[2:]
    else:
        result, rest = arrays[target], arrays[:target] + arrays[target + 1:]
    for array in rest:
        ufunc(result, array, out=result)
    return result


def _elementwise(ufunc, scalar=None, mean=False):
    def build(p, layer, weights):
        alpha = np.float32(getattr(p, "alpha", 0))

        def run(args, owned):
            if len(args) == 1:
                if scalar is None:  # max / min / average of one input: itself
                    return [args[0].copy()]
                return [scalar(args[0], alpha, out=_out(args[0], owned[0]))]
            y = _combine(args, owned, ufunc)
            if mean:
                y /= np.float32(len(args))
            return [y]
        return run, False
    return build


_builder("add")(_elementwise(np.add, np.add))
_builder("multiply")(_elementwise(np.multiply, np.multiply))
_builder("average")(_elementwise(np.add, mean=True))
_builder("max", "maxBroadcastable")(_elementwise(np.maximum))
_builder("min", "minBroadcastable")(_elementwise(np.minimum))
_builder("addBroadcastable")(_elementwise(np.add))
_builder("multiplyBroadcastable")(_elementwise(np.multiply))


def _binary(ufunc):
    def build(p, layer, weights):
        def run(args, owned):
            if len(args) != 2:
                raise ModelError(f"layer {layer.name!r} needs 2 inputs, got {len(args)}")
            a, b = _align(args)
            with np.errstate(divide="ignore", invalid="ignore"):
                return [kernels.to_float32(ufunc(a, b))]
        return run, False
    return build


_builder("subtractBroadcastable")(_binary(np.subtract))
_builder("divideBroadcastable")(_binary(np.divide))
_builder("powBroadcastable")(_binary(np.power))


@_builder("clip")
def _clip(p, layer, weights):
    low, high = np.float32(p.minVal), np.float32(p.maxVal)
    return (lambda args, owned: [np.clip(args[0], low, high, out=_out(args[0], owned[0]))]), False


@_builder("concat")
def _concat(p, layer, weights):
    axis = -5 if p.sequenceConcat else -3
    return (lambda args, owned: [np.concatenate(args, axis=axis)]), False


@_builder("concatND")
def _concat_nd(p, layer, weights):
    if p.interleave:
        raise _unsupported(layer, "concatND", "interleave")

    def run(args, owned):
        return [np.concatenate(args, axis=_axis(int(p.axis), args[0].ndim - 1, layer))]
    return run, False


@_builder("transpose")
def _transpose(p, layer, weights):
    order = (0, *(int(a) + 1 for a in p.axes))

    def run(args, owned):
        if len(order) != args[0].ndim:
            raise ModelError(f"layer {layer.name!r}: {len(order) - 1} axes for rank "
                             f"{args[0].ndim - 1}")
        return [np.ascontiguousarray(args[0].transpose(order))]
    return run, False


@_builder("permute")
def _permute(p, layer, weights):
    axes = tuple(int(a) for a in p.axis) or (0, 1, 2, 3)
    dims = (1, 3, 4, 5)  # Seq, C, H, W of (images, Seq, Batch, C, H, W); Batch stays
    order = (0, dims[axes[0]], 2, *(dims[a] for a in axes[1:]))

    def run(args, owned):
        if args[0].ndim != 6:
            raise ModelError(f"layer {layer.name!r}: permute needs a rank-5 input")
        return [np.ascontiguousarray(args[0].transpose(order))]
    return run, False


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


@_builder(*_REDUCERS)
def _reduce_nd(p, layer, weights):
    reducer = _REDUCERS[layer.WhichOneof("layer")]

    def run(args, owned):
        x = args[0]
        rank = x.ndim - 1
        axes = (tuple(range(1, rank + 1)) if p.reduceAll
                else tuple(sorted({_axis(int(a), rank, layer) for a in p.axes})))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y = kernels.to_float32(reducer(x, axes, p.keepDims))
        return [y.reshape(len(x), 1) if y.ndim == 1 else y]  # Core ML has no rank-0 tensors
    return run, False


@_builder("reduce")
def _reduce(p, layer, weights):
    axes = {0: (-3, -2, -1), 1: (-2, -1), 2: (-3,), 3: (-2,), 4: (-1,)}[p.axis]
    epsilon = np.float32(p.epsilon or 1e-6)
    modes = {0: "reduceSum", 1: "reduceMean", 2: "reduceProd", 4: "reduceSumSquare",
             5: "reduceL1", 6: "reduceL2", 7: "reduceMax", 8: "reduceMin"}

    def run(args, owned):
        x = args[0]
        if p.mode == 3:  # LOGSUM: sum of ln(x + epsilon)
            return [np.log(x + epsilon).sum(axis=axes, keepdims=True, dtype=np.float32)]
        if p.mode == 9:  # ARGMAX, along one axis
            if len(axes) != 1:
                raise _unsupported(layer, "reduce", "ARGMAX over several axes")
            return [np.argmax(x, axis=axes[0], keepdims=True).astype(np.float32)]
        return [kernels.to_float32(_REDUCERS[modes[p.mode]](x, axes, True))]
    if p.mode not in modes and p.mode not in (3, 9):
        raise _unsupported(layer, "reduce", f"mode {p.mode}")
    return run, False


@_builder("innerProduct")
def _inner_product(p, layer, weights):
    if getattr(p, "int8DynamicQuantize", False):
        raise _unsupported(layer, "innerProduct", "int8DynamicQuantize")
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
        return [y.reshape(shape)]
    return run, False


@_builder("batchedMatmul")
def _batched_matmul(p, layer, weights):
    if p.int8DynamicQuantize:
        raise _unsupported(layer, "batchedMatmul", "int8DynamicQuantize")
    if len(layer.input) == 1:
        x1, x2 = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
        # Stored as the transpose, [X2, X1] row-major (coremltools writes W.T; see the proto).
        w = np.ascontiguousarray(weights(p.weights, (x2, x1)).T)
        b = weights(p.bias, (x2,), "bias") if p.hasBias else None

        def run(args, owned):
            y = args[0] @ w
            if b is not None:
                y += b
            return [y]
        return run, False

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
        a, b = _align([a, b])
        return [np.matmul(a, b)]
    return run_two, False


@_builder("softmax")
def _softmax(p, layer, weights):
    return (lambda args, owned: [kernels.softmax(args[0], -3)]), False


@_builder("softmaxND")
def _softmax_nd(p, layer, weights):
    def run(args, owned):
        return [kernels.softmax(args[0], _axis(int(p.axis), args[0].ndim - 1, layer))]
    return run, False


def _reshaped(x, per_example_shape, layer):
    try:
        return x.reshape(len(x), *per_example_shape)
    except ValueError:
        raise ModelError(f"layer {layer.name!r} cannot reshape {x.shape[1:]} to "
                         f"{tuple(per_example_shape)}") from None


@_builder("flatten")
def _flatten(p, layer, weights):
    def run(args, owned):
        x = args[0]
        if p.mode == 1:  # CHANNEL_LAST: H, W, C order
            x = np.ascontiguousarray(np.moveaxis(x, -3, -1))
        return [x.reshape(*x.shape[:-3], -1, 1, 1)]
    return run, True


@_builder("flattenTo2D")
def _flatten_to_2d(p, layer, weights):
    def run(args, owned):
        x = args[0]
        rank = x.ndim - 1
        axis = int(p.axis) + rank if p.axis < 0 else int(p.axis)
        if not 0 <= axis <= rank:
            raise ModelError(f"layer {layer.name!r}: axis {p.axis} for rank {rank}")
        shape = x.shape[1:]
        return [_reshaped(x, (int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))), layer)]
    return run, True


@_builder("reshapeStatic")
def _reshape_static(p, layer, weights):
    target = tuple(int(d) for d in p.targetShape)
    return (lambda args, owned: [_reshaped(args[0], target, layer)]), True


@_builder("rankPreservingReshape")
def _rank_preserving_reshape(p, layer, weights):
    def run(args, owned):
        shape = args[0].shape[1:]
        return [_reshaped(args[0], [s if t == 0 else t for s, t in zip(shape, p.targetShape)],
                          layer)]
    return run, True


@_builder("reshape")
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
            y = _reshaped(x, (seq, x.shape[2], h, w, c), layer)
            return [np.ascontiguousarray(np.moveaxis(y, 5, 3))]
        return [_reshaped(x, (seq, x.shape[2], c, h, w), layer)]
    return run, True


@_builder("squeeze")
def _squeeze(p, layer, weights):
    def run(args, owned):
        x = args[0]
        shape = x.shape[1:]
        if p.squeezeAll:
            drop = {i for i, size in enumerate(shape) if size == 1}
        else:
            drop = {_axis(int(a), len(shape), layer) - 1 for a in p.axes}
            if any(shape[i] != 1 for i in drop):
                raise ModelError(f"layer {layer.name!r} cannot squeeze axes {sorted(drop)} "
                                 f"of shape {shape}")
        kept = [size for i, size in enumerate(shape) if i not in drop]
        return [x.reshape(len(x), *(kept or [1]))]
    return run, True


@_builder("expandDims")
def _expand_dims(p, layer, weights):
    def run(args, owned):
        x = args[0]
        rank = x.ndim - 1 + len(p.axes)
        new = {_axis(int(a), rank, layer) - 1 for a in p.axes}
        sizes = iter(x.shape[1:])
        return [x.reshape(len(x), *(1 if i in new else next(sizes) for i in range(rank)))]
    return run, True


@_builder("copy")
def _copy(p, layer, weights):
    return (lambda args, owned: [args[0].copy()]), False


@_builder("sliceStatic")
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
            y = _reshaped(y, kept or [1], layer)
        return [y]
    return run, True


@_builder("loadConstantND")
def _load_constant_nd(p, layer, weights):
    shape = tuple(int(d) for d in p.shape)
    data = weights(p.data, shape, "data")[None]  # one copy, broadcast against the images
    return (lambda args, owned: [data.copy()]), False


@_builder("batchnorm")
def _batchnorm(p, layer, weights):
    if p.computeMeanVar:
        raise _unsupported(layer, "batchnorm", "computeMeanVar")
    c = (int(p.channels),)
    gamma, beta = weights(p.gamma, c, "gamma"), weights(p.beta, c, "beta")
    mean, variance = weights(p.mean, c, "mean"), weights(p.variance, c, "variance")
    scale = gamma / np.sqrt(variance + np.float32(p.epsilon or 1e-5))
    shift = (beta - mean * scale).reshape(-1, 1, 1)
    scale = scale.reshape(-1, 1, 1)

    def run(args, owned):
        y = np.multiply(args[0], scale, out=_out(args[0], owned[0]))
        y += shift
        return [y]
    return run, False


def _chw(shape):
    """A scale / bias parameter of shape [1], [C], [1, H, W] or [C, H, W] → broadcastable."""
    shape = tuple(int(d) for d in shape) or (1,)
    return shape, (shape[0], 1, 1) if len(shape) == 1 else shape


@_builder("scale")
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
        return [y]
    return run, False


@_builder("bias")
def _bias(p, layer, weights):
    stored, shape = _chw(p.shape)
    bias = weights(p.bias, stored, "bias").reshape(shape)
    return (lambda args, owned: [args[0] + bias]), False
