"""Executors of Core ML models in NumPy, for machines where Core ML itself does not run.

coremltools converts and saves on Linux, but ``MLModel.predict`` needs macOS. To verify a
converted ``.mlmodel`` (NeuralNetwork) or ``.mlpackage`` (ML Program) anyway, these executors run
the model's own layers / ops with their documented semantics (NeuralNetwork.proto, coremltools'
MIL op definitions), including the image preprocessing the model does itself, in float32, or
with float16 compute emulated by rounding every intermediate result (``compute_precision``).

``load(path)`` picks the executor for the model's kind. Each executor has ``labels``,
``input_name``, ``input_size``, ``color`` and ``predict(pixels)`` (uint8 RGB images → float32
probabilities in ``labels`` order), plus ``run(inputs)`` for layer-level tests. Every error
they raise is a ``ModelError`` (``UnsupportedLayer`` for a layer / op they do not implement).

One executor core serves both formats; each format only lowers its spec to its plan:

- ``plan``: steps, the one scheduler (release, in-place, blocks of images), float16 emulation;
- ``registry``: the registry type of layer kinds / op types, and the "not implemented" error;
- ``kernels``: the NumPy arithmetic both share (convolution, pooling, padding, softmax, ...);
- ``inputs``: what ``predict`` / ``run`` accept, checked and converted alike;
- ``neuralnetwork``: the ``.mlmodel`` executor; its layers in ``nn_layers`` (registry) and
  ``nn_layers_spatial`` / ``_math`` / ``_shape``, its weights read by ``nn_weights``;
- ``mlprogram``: the ``.mlpackage`` executor; its ops in ``mil_ops`` (registry) and
  ``mil_ops_nn`` / ``_elementwise`` / ``_tensor``, its values read by ``mil_values``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from toolchain.errors import ModelError, UnsafeModel, UsageError, describe
from toolchain.untrusted import LIMITS, check_input_side, shown, size_text
from toolchain.untrusted.files import check_package

COMPUTE_PRECISIONS = ("float32", "float16")
#: The spec types (``Model.Type``) each Core ML format is stored as: the one list the loader
#: below, the NeuralNetwork executor and the Core ML target's inspector read.
SPEC_KINDS = {"neuralnetwork": ("neuralNetworkClassifier", "neuralNetwork",
                                "neuralNetworkRegressor"),
              "mlprogram": ("mlProgram",)}


def check_precision(compute_precision: str) -> str:
    """``compute_precision`` itself, or a UsageError naming the accepted values."""
    if compute_precision not in COMPUTE_PRECISIONS:
        raise UsageError(f"unknown compute precision {compute_precision!r}",
                         hint="compute_precision takes " + " or ".join(COMPUTE_PRECISIONS))
    return compute_precision


def load_spec(path):
    """The Core ML spec at ``path``, parsed once per file version.

    Parsing is slow with pure-Python protobuf (about a minute for Inception V3's ``.mlmodel``;
    the tasklib extra's protobuf 3.20), and the verifier needs the spec for the precision, the
    labels and the executor: one parse serves them all. The key includes size and mtime, so a
    rewritten file is parsed again.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise ModelError(f"no Core ML model at {path}: {error.strerror}") from error
    if path.is_dir():  # an .mlpackage: only files, every manifest path inside it
        check_package(path)
    elif stat.st_size > LIMITS.model_bytes:
        raise UnsafeModel(f"{shown(str(path))} is {size_text(stat.st_size)}, more than the "
                          f"limit of {size_text(LIMITS.model_bytes)}; it is not read")
    spec = _parsed(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    for feature in spec.description.input:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            check_input_side(max(int(image.width), int(image.height)), str(path))
    return spec


def clear_spec_cache() -> None:
    """Forget every parsed spec (``toolchain bench`` times a parse from the file)."""
    _parsed.cache_clear()


@functools.lru_cache(maxsize=4)
def _parsed(path: str, mtime_ns: int, size: int):
    import coremltools as ct

    try:
        return ct.utils.load_spec(path)
    except Exception as error:  # noqa: BLE001 (protobuf and coremltools raise assorted types)
        raise ModelError(f"cannot read Core ML model {path}: {describe(error)}") from error


def load(path, compute_precision: str = "float32"):
    """The executor for the Core ML model at ``path`` (.mlmodel or .mlpackage)."""
    check_precision(compute_precision)
    path = Path(path)
    spec = load_spec(path)
    kind = spec.WhichOneof("Type")
    if kind in SPEC_KINDS["neuralnetwork"]:
        from toolchain.runtimes import neuralnetwork

        return neuralnetwork.Executor(spec, path, compute_precision)
    if kind in SPEC_KINDS["mlprogram"]:
        from toolchain.runtimes import mlprogram

        return mlprogram.Executor(spec, path, compute_precision)
    raise ModelError(f"{path.name} is a Core ML {kind or 'empty'} model, not a neural network "
                     f"or ML Program the NumPy executor runs")
