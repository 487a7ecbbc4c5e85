"""NeuralNetwork layers that move data (``nn_layers_shape``) against NumPy: concatenations,
the reshape family (examples never mixed), slices.
"""

from __future__ import annotations

import numpy as np

from tests.toolchain.runtimes.nn_helpers import (
    N,
    close,
    network,
    random,
    run,
)


def test_concat_channel_and_nd():
    a, b = random(N, 2, 3, 4), random(N, 3, 3, 4)

    def build(nn):
        nn.add_elementwise("cat", ["a", "b"], "c", "CONCAT")
        nn.add_concat_nd("catnd", ["c", "c"], "y", axis=-1)
    spec = network({"a": (1, 2, 3, 4), "b": (1, 3, 3, 4)}, build)
    c = np.concatenate([a, b], axis=1)
    close(run(spec, {"a": a, "b": b}), np.concatenate([c, c], axis=-1))


def test_reshapes_keep_examples_apart():
    x = random(N, 2, 3, 4)

    def build(nn):
        nn.add_flatten_to_2d("flat", "x", "f", axis=1)  # (1, 24)
        nn.add_expand_dims("expand", "f", "e", axes=[-1, -2])  # (1, 24, 1, 1)
        nn.add_squeeze("squeeze", "e", "s", axes=[2, 3])  # (1, 24)
        nn.add_reshape_static("reshape", "s", "y", [1, 4, 6])
    spec = network({"x": (1, 2, 3, 4)}, build)
    close(run(spec, {"x": x}), x.reshape(N, 4, 6))


def test_slice_static_with_squeeze_masks():
    x = random(N, 4, 6)
    spec = network({"x": (1, 4, 6)}, lambda nn: nn.add_slice_static(
        "slice", "x", "y", begin_ids=[0, 2, 1], end_ids=[1, 3, 6], strides=[1, 1, 2],
        begin_masks=[False] * 3, end_masks=[False] * 3, squeeze_masks=[False, True, False]))
    close(run(spec, {"x": x}), x[:, 2, 1:6:2])
