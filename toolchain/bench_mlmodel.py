"""``toolchain bench``'s Core ML ``.mlmodel`` figures: conversion and parse time, against goals.

A NeuralNetwork ``.mlmodel`` is one protobuf message holding every weight, so how fast it is
written and read depends on which protobuf backend is installed: the compiled one (``upb``,
protobuf 4 and later; the default install) or pure Python (protobuf 3.20, which tflite-support's
``tasklib`` extra pins, and which has no compiled wheel for Python 3.11). This part converts one
architecture (Inception V3 by default: 22 M weights, the largest in the registry) with a random
two-class head to a float32 ``.mlmodel`` through the converter, then parses the file as the
verifier does (``toolchain.runtimes.load_spec``, its cache cleared first), and prints both
against the goals (:data:`GOALS`) with the protobuf version and backend. Nothing is asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

#: Seconds: Inception V3's ``.mlmodel`` conversion and its parse for verification.
GOALS = {"convert_seconds": 60.0, "parse_seconds": 5.0}
DEFAULT_ARCHITECTURE = "inception_v3"


def protobuf_backend() -> tuple[str, str]:
    """(protobuf's version, its backend: ``upb``, ``cpp`` or ``python``)."""
    import google.protobuf
    from google.protobuf.internal import api_implementation

    return google.protobuf.__version__, api_implementation.Type()


def bench_mlmodel(work: Path, architecture: str = DEFAULT_ARCHITECTURE,
                  weights: str = "none") -> dict:
    """Convert ``architecture`` with a random head to ``model_float32.mlmodel`` in ``work``,
    then parse it; seconds for each, the file's size and the protobuf in use."""
    import numpy as np
    import tensorflow as tf

    import targets
    from targets import ArtifactMetadata, Source
    from toolchain import backbones, runtimes
    from toolchain.conversion import convert
    from toolchain.training import join

    spec = backbones.get(architecture)
    backbone = backbones.load(spec, backbones.WeightsChoice.parse(weights))
    head = tf.keras.layers.Dense(2, activation="softmax", name="final_result")
    head.build((None, backbone.bottleneck_size))
    head.set_weights([np.random.default_rng(0).normal(0, 0.01, w.shape).astype(np.float32)
                      for w in head.get_weights()])
    source = Source(labels=("a", "b"), input_size=spec.input_size,
                    preprocessing=spec.preprocessing, architecture=spec.name,
                    user_defined={"architecture": spec.name}, calibration=(),
                    keras_model=join(backbone, head))
    target = targets.get("coreml")
    options = target.options_class(format="neuralnetwork", precision="float32")
    start = time.perf_counter()
    conversion = convert(source, [(target, options)], ArtifactMetadata(), work)[0]
    convert_seconds = time.perf_counter() - start
    version, backend = protobuf_backend()
    result = {"architecture": spec.name, "weights": weights, "protobuf": version,
              "protobuf_backend": backend, "ok": conversion.ok, "error": conversion.error,
              "convert_seconds": convert_seconds, "goals": dict(GOALS)}
    if conversion.ok:
        runtimes.clear_spec_cache()
        start = time.perf_counter()
        runtimes.load_spec(conversion.path)
        result["parse_seconds"] = time.perf_counter() - start
        result["bytes"] = conversion.path.stat().st_size
    return result


def format_mlmodel(result: dict) -> str:
    """Two lines: each figure beside its goal, and the protobuf that gave them."""
    head = (f"Core ML .mlmodel, {result['architecture']} (float32, {result['weights']} "
            f"weights), protobuf {result['protobuf']} ({result['protobuf_backend']})")
    if not result["ok"]:
        return f"{head}\n  conversion failed: {result['error']}"
    goals = result["goals"]
    return (f"{head}\n"
            f"  convert {result['convert_seconds']:7.1f} s   goal <= {goals['convert_seconds']:g} s"
            f"\n  parse   {result['parse_seconds']:7.2f} s   goal <= {goals['parse_seconds']:g} s"
            f"\n  size    {result['bytes'] / 1e6:7.1f} MB")
