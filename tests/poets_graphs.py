"""Builders of frozen graphs with retrain.py's exact structure (TensorFlow for Poets 1 and 2).

retrain.py imported a frozen ImageNet graph, added its head in TF1 graph mode and froze the
result with ``graph_util.convert_variables_to_constants(sess, graph_def, ['final_result'])``::

    with tf.name_scope('input'):   # 'input_1' when the backbone's image input is 'input'
        bottleneck_input = tf.placeholder_with_default(
            bottleneck_tensor, shape=[None, size], name='BottleneckInputPlaceholder')
    with tf.name_scope('final_training_ops'):
        with tf.name_scope('weights'): final_weights = tf.Variable(..., name='final_weights')
        with tf.name_scope('biases'): final_biases = tf.Variable(..., name='final_biases')
        with tf.name_scope('Wx_plus_b'): logits = tf.matmul(bottleneck_input, weights) + biases
    final_tensor = tf.nn.softmax(logits, name='final_result')

These builders do the same on tiny backbones: TF for Poets 2 with a TF-slim-named MobileNet
(``MobilenetV1/...``, ``MobilenetV1/Predictions/Reshape``) or a frozen Keras MobileNet v1
(alpha 0.25, 128 px, weights none), and TF for Poets 1 with Inception V3's preprocessing nodes
(``DecodeJpeg/contents`` → DecodeJpeg → Cast → ExpandDims → ResizeBilinear 299 → Sub 128 →
Mul 1/128) before a few strided convolutions ending in ``pool_3/_reshape``. The head's weights
are seeded and scaled so the probabilities are far from uniform, as a trained head's are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The labels of every graph built here.
GRAPH_LABELS = ("cats", "dogs", "snowfield")


def _head(tf, bottleneck, size: int, scope: str, seed: int, scale: float):
    """retrain.py's add_final_training_ops (and its BottleneckInputPlaceholder)."""
    rng = np.random.default_rng(seed)
    with tf.compat.v1.name_scope(scope):
        bottleneck_input = tf.compat.v1.placeholder_with_default(
            bottleneck, shape=[None, size], name="BottleneckInputPlaceholder")
        tf.compat.v1.placeholder(tf.float32, [None, len(GRAPH_LABELS)], name="GroundTruthInput")
    with tf.compat.v1.name_scope("final_training_ops"):
        with tf.compat.v1.name_scope("weights"):
            weights = tf.compat.v1.Variable(
                (rng.standard_normal((size, len(GRAPH_LABELS))) * scale).astype(np.float32),
                name="final_weights")
        with tf.compat.v1.name_scope("biases"):
            biases = tf.compat.v1.Variable(np.zeros(len(GRAPH_LABELS), np.float32),
                                           name="final_biases")
        with tf.compat.v1.name_scope("Wx_plus_b"):
            logits = tf.matmul(bottleneck_input, weights) + biases
    return tf.nn.softmax(logits, name="final_result")


def _freeze(tf, graph, path: Path) -> Path:
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(tf.compat.v1.global_variables_initializer())
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
            session, graph.as_graph_def(), ["final_result"])
    path.write_bytes(frozen.SerializeToString())
    (path.parent / "retrained_labels.txt").write_text("".join(f"{label}\n"
                                                              for label in GRAPH_LABELS))
    return path


def _variable(tf, rng, shape, name):
    fan_in = float(np.prod(shape[:-1]))
    value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return tf.compat.v1.Variable(value.astype(np.float32), name=name)


def slim_mobilenet_graph(path: Path, size: int = 128, alpha: float = 0.25,
                         scope: str = "MobilenetV1") -> Path:
    """TF for Poets 2 on a TF-slim-named MobileNet v1 stump: ``input`` [1, size, size, 3] →
    Conv2d_0 (32*alpha) → depthwise/pointwise → Logits → ``MobilenetV1/Predictions/Reshape``
    (1001 logits, retrain.py's MobileNet bottleneck) → ``input_1/BottleneckInputPlaceholder``
    → final_training_ops → ``final_result``. Another ``scope`` makes an unknown architecture."""
    import tensorflow as tf

    rng, depth = np.random.default_rng(3), int(32 * alpha)
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.float32, [1, size, size, 3], name="input")
        with tf.compat.v1.name_scope(scope):
            with tf.compat.v1.name_scope("Conv2d_0"):
                x = tf.nn.conv2d(image, _variable(tf, rng, [3, 3, 3, depth], "weights"),
                                 [1, 2, 2, 1], "SAME")
                x = tf.nn.relu6(x, name="Relu6")
            with tf.compat.v1.name_scope("Conv2d_1_depthwise"):
                x = tf.nn.depthwise_conv2d(x, _variable(tf, rng, [3, 3, depth, 1],
                                                        "depthwise_weights"),
                                           [1, 2, 2, 1], "SAME")
                x = tf.nn.relu6(x, name="Relu6")
            with tf.compat.v1.name_scope("Conv2d_1_pointwise"):
                x = tf.nn.conv2d(x, _variable(tf, rng, [1, 1, depth, 2 * depth], "weights"),
                                 [1, 2, 2, 1], "SAME")
                x = tf.nn.relu6(x, name="Relu6")
            with tf.compat.v1.name_scope("Logits"):
                x = tf.nn.avg_pool2d(x, [1, size // 8, size // 8, 1], [1, 1, 1, 1], "VALID",
                                     name="AvgPool_1a")
                with tf.compat.v1.name_scope("Conv2d_1c_1x1"):
                    x = tf.nn.conv2d(x, _variable(tf, rng, [1, 1, 2 * depth, 1001], "weights"),
                                     [1, 1, 1, 1], "SAME")
                    x = tf.nn.bias_add(x, tf.constant(np.zeros(1001, np.float32)))
                x = tf.squeeze(x, [1, 2], name="SpatialSqueeze")
            with tf.compat.v1.name_scope("Predictions"):
                bottleneck = tf.reshape(x, [-1, 1001], name="Reshape")
                tf.reshape(tf.nn.softmax(bottleneck, name="Softmax"), [1, 1001],
                           name="Reshape_1")
        _head(tf, bottleneck, 1001, "input", seed=4, scale=0.15)
    return _freeze(tf, graph, path)


def keras_mobilenet_graph(path: Path, size: int = 128, alpha: float = 0.25) -> Path:
    """TF for Poets 2 on a frozen Keras MobileNet v1 (seeded weights, Keras layer names
    ``conv1``, ``conv_dw_1``, ...; image input ``input``), then retrain.py's head."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    from toolchain import backbones

    # the registry's seeded, batch-norm-calibrated init: Keras' own random MobileNet gives a
    # bottleneck of ~1e-15, so every image would get the same probabilities
    backbone = backbones.get(f"mobilenet_{alpha:g}_{size}").build(seed=0)
    serve = tf.function(lambda image: backbone(image, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 3], tf.float32, name="input"))
    frozen = convert_variables_to_constants_v2(serve)
    backbone_def = frozen.graph.as_graph_def()
    bottleneck_name = frozen.outputs[0].name
    width = int(frozen.outputs[0].shape[-1])
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(backbone_def, name="")
        bottleneck = graph.get_tensor_by_name(bottleneck_name)
        _head(tf, bottleneck, width, "input", seed=5, scale=0.2)
    return _freeze(tf, graph, path)


def inception_graph(path: Path, size: int = 299) -> Path:
    """TF for Poets 1: Inception V3's JPEG decoding and normalisation nodes (``Mul`` is the
    normalised image), a few strided convolutions standing in for the backbone (one
    ``mixed_10/join``), ``pool_3`` and ``pool_3/_reshape`` [1, 64], the original ImageNet
    ``softmax``, then ``input/BottleneckInputPlaceholder`` → final_training_ops →
    ``final_result``."""
    import io

    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(6)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(jpeg, "JPEG")
    graph = tf.Graph()
    with graph.as_default():
        contents = tf.constant(jpeg.getvalue(), name="DecodeJpeg/contents")
        decoded = tf.image.decode_jpeg(contents, channels=3, name="DecodeJpeg")
        pixels = tf.cast(decoded, tf.float32, name="Cast")
        batch = tf.expand_dims(pixels, 0, name="ExpandDims")
        resized = tf.compat.v1.image.resize_bilinear(
            batch, tf.constant([size, size], name="ResizeBilinear/size"), name="ResizeBilinear")
        image = tf.multiply(tf.subtract(resized, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        with tf.compat.v1.name_scope("conv"):
            x = tf.nn.relu(tf.nn.conv2d(image, _variable(tf, rng, [3, 3, 3, 16], "conv2d_params"),
                                        [1, 4, 4, 1], "VALID"), name="Relu")
        with tf.compat.v1.name_scope("mixed_10"):
            left = tf.nn.conv2d(x, _variable(tf, rng, [1, 1, 16, 32], "left_params"),
                                [1, 4, 4, 1], "SAME")
            # over coremltools' 2048-element threshold, so ML Programs store (and int8
            # quantizes) a weight file, as every real backbone's
            right = tf.nn.conv2d(x, _variable(tf, rng, [3, 3, 16, 32], "right_params"),
                                 [1, 4, 4, 1], "SAME")
            x = tf.nn.relu(tf.concat([left, right], 3, name="join"))
        pool = tf.nn.avg_pool2d(x, [1, 19, 19, 1], [1, 1, 1, 1], "VALID", name="pool_3")
        bottleneck = tf.reshape(pool, [-1, 64], name="pool_3/_reshape")
        tf.nn.softmax(tf.matmul(bottleneck, _variable(tf, rng, [64, 1008], "softmax/weights")),
                      name="softmax")
        _head(tf, bottleneck, 64, "input", seed=7, scale=0.15)
    return _freeze(tf, graph, path)


def graph_probabilities(path: Path, feed: str, values: np.ndarray) -> np.ndarray:
    """What the original frozen graph gives, untouched (placeholders-with-default included),
    fed ``values`` one image at a time at tensor ``feed`` (``input:0`` normalised pixels for
    TF for Poets 2; ``ResizeBilinear:0`` raw 0..255 pixels for TF for Poets 1)."""
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(Path(path).read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return np.concatenate([session.run("final_result:0", {feed: value[None]})
                               for value in np.asarray(values, np.float32)])
