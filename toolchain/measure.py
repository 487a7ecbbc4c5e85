"""Run one artifact in every runtime that can run it here, in a child process by default.

The verifier compares; this module only produces numbers: for one artifact, its precision and,
per runtime, the labels it embeds and its probabilities for the held-out pixels (or the error).

Why a child process: a runtime can die rather than raise. ``tf.lite.Interpreter`` segfaults on a
truncated ``.tflite`` (checked with TensorFlow 2.13.1), which would take the verifier, and the
report it was about to write, down with it. In a child, a crash is one failed check naming the
signal, the other artifacts are still checked, and the report is still written. The child gets
the same decoded pixels through a ``.npy`` file, so every runtime sees identical input.

A runner whose ``full_size`` is true (an app runtime's full-size row) is fed each photo at its own
size instead, decoded by :func:`toolchain.images.load_full_rgb` one at a time (a list of one
``(height, width, 3)`` array per call), so that it resizes them itself as an app does. Photos are
passed as paths (a list of full-size photos would not fit in memory); without them such a
runner is left out.

``python -m toolchain.measure TARGET ARTIFACT PIXELS.npy OUT_DIR BATCH [PHOTOS.json]
[--first-only]`` is the child's entry. ``toolchain label`` runs an artifact's first runtime the
same way, so a file that crashes its runtime is one line there too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.errors import describe, first_line

#: How long one artifact may take in all its runtimes before it counts as hung.
TIMEOUT_SECONDS = 3600.0
#: How long ``label``'s one image in one runtime may take.
LABEL_TIMEOUT_SECONDS = 600.0
_RESULT, _PROBS, _PHOTOS = "result.json", "probabilities.npz", "photos.json"
#: What the child prints on stderr as each runtime starts.
_RUNNING = "toolchain.measure: running "
#: The child's flag for :func:`measure`'s ``first_only``.
_FIRST = "--first-only"


@dataclass
class RuntimeResult:
    runtime: str
    labels: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    error: str = ""
    seconds: float = 0.0
    #: Fed the full-size photos (the runtime resized them), not the resized pixels.
    full_size: bool = False
    #: The precision a device row computes in (``Runner.compute``); None: the file as stored.
    compute: str | None = None


@dataclass
class Measured:
    """What running one artifact gave: its precision (or why it could not be read), and one
    result per runtime (empty when no runtime here can run it)."""

    precision: str | None = None
    error: str = ""
    runtimes: list[RuntimeResult] = field(default_factory=list)


def measure(target, path: Path, pixels: np.ndarray, batch_size: int,
            on_runtime=None, photos=None, first_only: bool = False) -> Measured:
    """In this process: precision, then every runtime on all pixels, batch by batch (and each
    full-size runner on ``photos``, the same images' files, one by one); with ``first_only``,
    the first runtime alone (``label``).

    ``on_runtime(name)`` is called as each runtime starts (the child process reports it, so a
    runtime that hangs can be named)."""
    try:
        precision = target.precision(path)
    except Exception as error:  # noqa: BLE001 (a corrupt file is a failed check, not a crashed run)
        return Measured(error=f"cannot read the artifact: {describe(error)}")
    try:
        runners = target.runners(path)
    except Exception as error:  # noqa: BLE001 (any failure here is reported, never raised)
        return Measured(precision, f"no runtime could load it: {describe(error)}")
    measured = Measured(precision)
    with runners:
        for runner in runners[:1] if first_only else runners:
            full_size = bool(getattr(runner, "full_size", False))
            if full_size and photos is None:
                continue
            if on_runtime is not None:
                on_runtime(runner.runtime)
            measured.runtimes.append(_run(runner, pixels, batch_size, photos if full_size
                                          else None))
    return measured


def _run(runner, pixels: np.ndarray, batch_size: int, photos) -> RuntimeResult:
    """One runtime on every image: ``pixels`` batch by batch, or (a full-size runner) each of
    ``photos`` at its own size; a runtime that raises is a failed result, not a failed run."""
    import time

    from toolchain.images import load_full_rgb

    result = RuntimeResult(runner.runtime, tuple(runner.labels), full_size=photos is not None,
                           compute=getattr(runner, "compute", None))
    start = time.perf_counter()
    try:
        if photos is not None:
            outputs = [runner([load_full_rgb(photo)]) for photo in photos]
        else:
            outputs = [runner(pixels[i:i + batch_size])
                       for i in range(0, len(pixels), batch_size)]
    except Exception as error:  # noqa: BLE001 (an artifact that crashes fails its check)
        result.error = f"crashed: {describe(error)}"
    else:
        result.probabilities, result.error = _joined(outputs)
    result.seconds = time.perf_counter() - start
    return result


def _joined(outputs: list) -> tuple[np.ndarray | None, str]:
    """A runner's batch outputs as one float32 array, or (None, why not). A batch that gave
    nothing (None) leaves the probabilities None, which the verifier reports as "returned
    nothing"; every other shape is passed on for the verifier to judge."""
    if any(output is None for output in outputs):
        return None, ""
    try:
        arrays = [np.asarray(output, np.float32) for output in outputs]
    except (TypeError, ValueError) as error:
        return None, f"returned something that is not numbers: {describe(error)}"
    if len(arrays) == 1:
        return arrays[0], ""
    shapes = [array.shape for array in arrays]
    if any(not shape for shape in shapes) or len({shape[1:] for shape in shapes}) != 1:
        return None, "returned batches of shapes " + ", ".join(map(str, shapes))
    return np.concatenate(arrays), ""


def measure_isolated(target, path: Path, pixels: np.ndarray, batch_size: int,
                     timeout: float = TIMEOUT_SECONDS, photos=None,
                     first_only: bool = False) -> Measured:
    """:func:`measure` in a child process; a child that dies or hangs is a failed measurement."""
    with tempfile.TemporaryDirectory(prefix="toolchain-verify-") as scratch:
        scratch = Path(scratch)
        np.save(scratch / "pixels.npy", pixels)
        command = [sys.executable, "-m", "toolchain.measure", target.name, str(Path(path)),
                   str(scratch / "pixels.npy"), str(scratch), str(batch_size)]
        if first_only:
            command.append(_FIRST)
        if photos is not None:
            (scratch / _PHOTOS).write_text(json.dumps([str(photo) for photo in photos]),
                                           encoding="utf-8")
            command.append(str(scratch / _PHOTOS))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   env=env, check=False)
        except subprocess.TimeoutExpired as expired:
            return Measured(error=_hung(timeout, expired.stderr))
        if child.returncode != 0 or not (scratch / _RESULT).is_file():
            return Measured(error=_death(child.returncode, child.stderr))
        return _read(scratch)


def _hung(timeout: float, stderr: str | bytes | None) -> str:
    """The reason for a child killed at the time limit, naming the runtime it was in."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    running = [line[len(_RUNNING):] for line in (stderr or "").splitlines()
               if line.startswith(_RUNNING)]
    where = f" ({running[-1]} was running)" if running else ""
    return f"its runtime did not finish within {timeout:g} s{where}"


def _death(code: int, stderr: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        cause = f"its runtime crashed the process ({name})"
    else:
        cause = f"its runtime exited with code {code}"
    lines = [line for line in stderr.strip().splitlines()
             if line.strip() and not line.startswith((" ", "Fatal Python", "Current thread",
                                                      "Thread 0x", "Extension modules", _RUNNING))]
    return cause + (f": {lines[-1][:200]}" if lines else "")


def _write(measured: Measured, folder: Path) -> None:
    arrays = {str(i): r.probabilities for i, r in enumerate(measured.runtimes)
              if r.probabilities is not None}
    np.savez(folder / _PROBS, **arrays)
    record = {"precision": measured.precision, "error": measured.error,
              "runtimes": [{"runtime": r.runtime, "labels": list(r.labels), "error": r.error,
                            "seconds": r.seconds, "full_size": r.full_size,
                            "compute": r.compute}
                           for r in measured.runtimes]}
    (folder / _RESULT).write_text(json.dumps(record), encoding="utf-8")


def _read(folder: Path) -> Measured:
    record = json.loads((folder / _RESULT).read_text(encoding="utf-8"))
    with np.load(folder / _PROBS, allow_pickle=False) as arrays:
        runtimes = [RuntimeResult(item["runtime"], tuple(item["labels"]),
                                  arrays[str(i)] if str(i) in arrays else None,
                                  item["error"], item["seconds"], item["full_size"],
                                  item["compute"])
                    for i, item in enumerate(record["runtimes"])]
    return Measured(record["precision"], record["error"], runtimes)


def main(argv: list[str]) -> int:
    """The child: measure one artifact, write the result files into OUT_DIR."""
    import logging

    import targets

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    first_only = _FIRST in argv
    argv = [arg for arg in argv if arg != _FIRST]
    name, path, pixels, out, batch = argv[:5]
    photos = None
    if len(argv) > 5:
        photos = [Path(photo) for photo in json.loads(Path(argv[5]).read_text(encoding="utf-8"))]

    def running(runtime: str) -> None:
        print(f"{_RUNNING}{runtime}", file=sys.stderr, flush=True)

    try:
        target = targets.get(name)
        _block(target.runners_never_import)
        pixels = np.load(pixels, allow_pickle=False)
        measured = measure(target, Path(path), pixels, int(batch), running, photos, first_only)
    except Exception as error:  # noqa: BLE001 (the child reports; the parent decides)
        measured = Measured(error=f"measuring failed: {first_line(error)}")
    _write(measured, Path(out))
    return 0


def _block(modules: tuple[str, ...]) -> None:
    """Make ``import`` of each of ``modules`` fail in this child, as if it were not installed.

    A child measures one artifact and exits, so every import it makes is paid per artifact:
    coremltools imports TensorFlow when it is installed (most of a Core ML child's 7 s start)
    only to offer converters the child never calls. Python's documented None entry in
    ``sys.modules`` makes the import raise ImportError, which coremltools takes as "no
    TensorFlow"."""
    for module in modules:
        if module not in sys.modules:
            sys.modules[module] = None  # type: ignore[assignment]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
