"""Files from strangers are data, never code: the checks every model file, archive and label a
user passes goes through before a library opens it.

A frozen graph is a program (TensorFlow runs any op in it, file I/O and Python callbacks
included); an HDF5 file named ``.keras`` is loaded by Keras' legacy path, where ``safe_mode``
does not apply; an ``.mlpackage``'s manifest can point anywhere and its folder can hold links; a
file of a few hundred bytes can declare gigabytes. So, as a browser treats a download:

- allow-lists, not deny-lists (:mod:`toolchain.untrusted.graphs`: the ops a frozen image
  classifier is made of);
- sizes checked against :data:`LIMITS` before anything is read or allocated;
- paths resolved inside their container, links never followed (:mod:`.files`);
- every refusal is one :class:`~toolchain.errors.UnsafeModel` line naming the file, what was
  found and the limit (exit 2), and every string from a file is printed through :func:`shown`.

What cannot be checked this way (a ``.tflite`` the native interpreter may crash on) runs in a
child process: see ``toolchain.measure``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from toolchain.errors import UnsafeModel


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a foreign file may declare; docs/ARCHITECTURE.md lists them with
    the largest legitimate value each was set against."""

    #: A frozen graph file, alone or in an archive (Inception V3's is 92 MB).
    graph_bytes: int = 512 << 20
    #: One constant's declared size (Inception V3's largest is 8 MB, its 2048x1008 logits).
    constant_bytes: int = 512 << 20
    #: All constants of a graph together, as declared (Inception V3: 92 MB).
    graph_constants_bytes: int = 2 << 30
    #: Elements of any tensor a graph computes, by its static shape (Inception V3 at 299 px:
    #: 1.4 M; a 4096-px input to a first convolution of 64 channels: 268 M).
    tensor_elements: int = 1 << 28
    #: A model's image input side, in pixels: larger than any phone camera frame's long side.
    input_side: int = 8192
    #: A model file read whole (a .tflite; MobileNet v1 1.0 float32 is 17 MB).
    model_bytes: int = 1 << 30
    #: A file packed inside a model (labels.txt, provenance.json in a .tflite).
    packed_file_bytes: int = 16 << 20
    #: Files packed inside a model (the toolchain packs two).
    packed_files: int = 16
    #: Labels in a model (ImageNet-21k has 21,843).
    labels: int = 100_000
    #: One label, in characters.
    label_chars: int = 256
    #: All members of an archive (a .tgz of frozen graphs, CIFAR-10's), as declared unpacked.
    archive_bytes: int = 2 << 30
    #: A JSON file inside a model (provenance.json, an .mlpackage's Manifest.json).
    json_bytes: int = 1 << 20
    #: Nesting depth of such JSON.
    json_depth: int = 32
    #: A split record (split.json lists every image: 100,000 photos take about 6 MB).
    split_bytes: int = 256 << 20


LIMITS = Limits()

#: Unicode categories printed escaped: controls (escape sequences among them), separators that
#: end a line, surrogates (undecodable file names), private and unassigned code points.
_HIDDEN = {"Cc", "Zl", "Zp", "Cs", "Co", "Cn"}
#: Format characters that reorder or hide text (bidirectional marks, embeddings, overrides and
#: isolates); the other format characters (the joiners inside emoji, say) are printed.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def hidden(char: str) -> bool:
    """Whether printing ``char`` could move the cursor, repaint the terminal, end a line or
    reorder what follows."""
    return char in _BIDI or unicodedata.category(char) in _HIDDEN


def shown(text: str) -> str:
    """``text`` as it may be printed: every :func:`hidden` character is written as a Python
    escape (``\\n``, ``\\x1b``, ``\\u202e``); letters of every script stay as they are."""
    if not any(hidden(c) for c in text):
        return text
    return "".join(repr(c)[1:-1] if hidden(c) else c for c in text)


def size_text(count: int) -> str:
    """Bytes in the largest unit that keeps a number above 1 (``512 MiB``), and the exact count
    when that unit rounds (``16 MiB (16,777,217 bytes)``: just over a limit of 16 MiB)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            exact = "" if count % (1 << 10) == 0 else f" ({count:,} bytes)"
            return f"{count / (1 << shift):.4g} {unit}{exact}"
    return f"{count} bytes"


def check_input_side(side: int, where: str, limits: Limits = LIMITS) -> int:
    """``side`` if a model's declared image input side is at most ``limits.input_side``: a
    larger one would allocate its pixels (3 x side squared) before anything could fail."""
    if side > limits.input_side:
        raise UnsafeModel(f"{shown(where)} declares a {side}x{side} image input, larger than "
                          f"the limit of {limits.input_side} pixels a side (any phone camera "
                          "frame fits); nothing is allocated for it")
    return side


def check_labels(labels, where: str, limits: Limits = LIMITS) -> tuple[str, ...]:
    """``labels`` if there are at most ``limits.labels`` of at most ``limits.label_chars``
    characters each."""
    labels = tuple(labels)
    if len(labels) > limits.labels:
        raise UnsafeModel(f"{shown(where)} holds {len(labels):,} labels, more than the limit of "
                          f"{limits.labels:,}")
    for label in labels:
        if len(label) > limits.label_chars:
            raise UnsafeModel(f"{shown(where)} holds a label of {len(label):,} characters, more "
                              f"than the limit of {limits.label_chars}: "
                              f"'{shown(label[:40])}...'")
    return labels
