"""NeuralNetwork layers that move data (``nn_layers_shape``) against NumPy: concatenations,
the reshape family (examples never mixed; the legacy layers on rank-5 blobs), permutes,
slices and copies.
"""

from __future__ import annotations

import numpy as np
import pytest

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


def _fold(y):
    """What run() returns for blobs of examples (1, ...): Core ML's leading 1 folded away."""
    return y.reshape(len(y), *y.shape[2:]) if y.shape[1] == 1 else y


@pytest.mark.parametrize("dim", [(0, 2, 3, 1), (0, 3, 1, 2), (3, 1, 2, 0), (0, 1, 2, 3)])
def test_permute_reorders_seq_c_h_w(dim):
    x = random(N, 2, 3, 4)
    spec = network({"x": (2, 3, 4)}, lambda nn: nn.add_permute("p", dim, "x", "y"), rank5=True)
    # An example is (Seq 1, Batch 1, C, H, W); dim orders (Seq, C, H, W), Batch stays put.
    seq_chw = x[:, None]  # (N, Seq, C, H, W)
    permuted = np.transpose(seq_chw, (0, *(d + 1 for d in dim)))
    close(run(spec, {"x": x}), _fold(permuted[:, :, None]))


@pytest.mark.parametrize("target", [(4, 3, 2), (1, 6, 2, 2), (2, 12, 1, 1)])
@pytest.mark.parametrize("mode", [0, 1])
def test_legacy_reshape_channel_first_and_last(target, mode):
    x = random(N, 2, 3, 4)
    spec = network({"x": (2, 3, 4)}, lambda nn: nn.add_reshape("r", "x", "y", target, mode),
                   rank5=True)
    seq, (c, h, w) = (1 if len(target) == 3 else target[0]), target[-3:]
    if mode == 0:  # CHANNEL_FIRST: the (C, H, W) values in order
        y = x.reshape(N, seq, c, h, w)
    else:  # CHANNEL_LAST: read as (H, W, C), reshaped to (H', W', C'), back to (C', H', W')
        y = np.transpose(np.transpose(x, (0, 2, 3, 1)).reshape(N, seq, h, w, c), (0, 1, 4, 2, 3))
    close(run(spec, {"x": x}), _fold(y[:, :, None]))


def test_rank_preserving_reshape_keeps_zeros_and_infers_minus_one():
    x = random(N, 2, 3, 4)
    spec = network({"x": (2, 3, 4)}, lambda nn: nn.add_rank_preserving_reshape(
        "r", "x", "y", [0, 4, -1]))
    close(run(spec, {"x": x}), x.reshape(N, 2, 4, 3))


def test_copy_is_a_new_blob_that_in_place_work_cannot_reach():
    """The ReLU may overwrite the copy it alone reads; x, read later, stays intact."""
    x = random(N, 2, 3)

    def build(nn):
        nn.add_copy("copy", "x", "c")
        nn.add_activation("relu", "RELU", "c", "r")
        nn.add_elementwise("add", ["r", "x"], "y", "ADD")
    close(run(network({"x": (2, 3)}, build), {"x": x}), np.maximum(x, 0) + x)
