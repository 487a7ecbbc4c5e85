"""``toolchain.untrusted``: the checks themselves, on small inputs (the hostile files end to end
are in tests/reliability/test_hostile_models.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import FAMILY_ARCHS, keras_model
from toolchain.errors import UnsafeModel
from toolchain.untrusted import LIMITS, check_input_side, check_labels, shown
from toolchain.untrusted import graphs as untrusted_graphs
from toolchain.untrusted.files import keras_format, load_json


@pytest.mark.parametrize("text, printed", [
    ("crème brûlée", "crème brûlée"),
    ("\x1b[2J\x1b[Hcleared", "\\x1b[2J\\x1b[Hcleared"),
    ("two\nlines\r", "two\\nlines\\r"),
    ("photo\u202egpj.exe", "photo\\u202egpj.exe"),
    ("family 👨\u200d👩\u200d👧", "family 👨\u200d👩\u200d👧"),
    ("undecodable \udc80", "undecodable \\udc80"),
    ("nul\x00", "nul\\x00"),
    ("line\u2028separator", "line\\u2028separator"),
])
def test_shown_escapes_what_could_repaint_or_reorder_and_nothing_else(text, printed):
    assert shown(text) == printed


def test_json_depth_is_counted_outside_strings_only():
    assert load_json(json.dumps({"a": "[[[[" * 50}).encode(), "x") == {"a": "[[[[" * 50}
    assert load_json(b'{"a": "\\"[[[["}', "x") == {"a": '"[[[['}
    deep = b"[" * (LIMITS.json_depth + 1) + b"]" * (LIMITS.json_depth + 1)
    with pytest.raises(UnsafeModel, match="nests more than 32 deep"):
        load_json(deep, "deep.json")
    assert load_json(b"[" * LIMITS.json_depth + b"]" * LIMITS.json_depth, "x")
    with pytest.raises(UnsafeModel, match="more than the limit of 1 MiB"):
        load_json(b" " * (LIMITS.json_bytes + 1), "big.json")


def test_limits_on_inputs_and_labels():
    assert check_input_side(8192, "m") == 8192
    with pytest.raises(UnsafeModel, match="declares a 8193x8193 image input"):
        check_input_side(8193, "m")
    assert check_labels(["a"] * 3, "m") == ("a", "a", "a")
    with pytest.raises(UnsafeModel, match="a label of 257 characters"):
        check_labels(["x" * 257], "m")


def test_keras_files_are_judged_by_their_bytes(tmp_path):
    (tmp_path / "zip.keras").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "h5.keras").write_bytes(b"\x89HDF\r\n\x1a\nrest")
    (tmp_path / "text.keras").write_bytes(b"hello")
    assert keras_format(tmp_path / "zip.keras") == "zip"
    with pytest.raises(UnsafeModel, match="is an HDF5 file, not the Keras v3 .keras format"):
        keras_format(tmp_path / "h5.keras")
    with pytest.raises(UnsafeModel, match="is not a zip archive"):
        keras_format(tmp_path / "text.keras")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", FAMILY_ARCHS)
def test_every_graph_the_toolchain_writes_is_allowed(architecture):
    """The allow-list's premise: the frozen graph of every family (as retrain --output_graph
    writes it, head included) holds only allowed ops, and its constants check out."""
    import tensorflow as tf

    from toolchain.model import frozen_graph_bytes

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(frozen_graph_bytes(keras_model(architecture)))
    assert {node.op for node in graph.node} <= untrusted_graphs.ALLOWED_OPS
    untrusted_graphs.check(graph, architecture)


def test_a_labels_file_is_read_within_the_limits(tmp_path):
    from toolchain.dataset import read_labels

    big = tmp_path / "labels.txt"
    with open(big, "wb") as out:
        out.truncate(LIMITS.packed_file_bytes + 1)  # sparse: no disk is spent
    with pytest.raises(UnsafeModel, match=r"labels file .* is 16 MiB \(16,777,217 bytes\), more "):
        read_labels(big)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"{i}\n" for i in range(LIMITS.labels + 1)))
    with pytest.raises(UnsafeModel, match="holds 100,001 labels"):
        read_labels(many)
