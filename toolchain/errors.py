"""Typed errors for every stage.

Each error carries a one-line message and an optional hint. The CLI prints them as
``toolchain: error: <message>`` (and ``hint: <hint>``) with a non-zero exit code; ``--debug``
shows the traceback instead. No stage prints tracebacks or calls ``sys.exit`` itself.
"""

from __future__ import annotations

#: Exit code for errors (bad input, missing files, failed conversions).
EXIT_ERROR = 2
#: Exit code when a verification check fails (the verifier's contract).
EXIT_CHECK_FAILED = 1
#: Exit code when no check failed but one met its threshold on too few images to show it (the
#: verdict is *inconclusive*: ``toolchain.verification``); ``--accept-small-set`` or
#: ``--min-images`` accept a small set, ``verify --images DIR`` checks on more photos.
EXIT_INCONCLUSIVE = 3
#: Exit code after Ctrl-C, as shells expect.
EXIT_INTERRUPTED = 130


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name): for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def describe(error: BaseException) -> str:
    """One line for an unexpected exception from a library: ``Type: first line`` (library types
    such as coremltools' say a lot), or just the message of a ToolchainError."""
    if isinstance(error, ToolchainError):
        return error.message
    name, text = type(error).__name__, first_line(error)
    return name if text == name else f"{name}: {text}"


class ToolchainError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(ToolchainError):
    """Command-line options that contradict each other or are out of range."""


class UnknownOption(UsageError, TypeError):
    """A keyword (Python API) or option name that no stage takes. Also a TypeError, which is
    what Python raises for an unexpected keyword argument."""


class DatasetError(ToolchainError):
    """The image folder cannot be used (missing, too few classes, empty split)."""


class UnreadableImage(ToolchainError):
    """One image cannot be decoded. Datasets skip these with a warning; ``label`` fails."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnknownArchitecture(ToolchainError):
    """An ``--architecture`` name that the backbone registry does not know."""


class WeightsUnavailable(ToolchainError):
    """ImageNet weights are neither cached nor downloadable, or a weights file is unusable."""


class WriteError(ToolchainError):
    """An output file or folder cannot be written (permissions, a full disk, a file in the way)."""


class FolderBusy(WriteError):
    """Another toolchain process is writing the output folder asked for (``atomic.exclusive``)."""


class ConversionError(ToolchainError):
    """A target's converter failed, or the artifact it wrote reads back other than asked."""


class CacheError(ToolchainError):
    """The bottleneck cache directory cannot be created or written."""


class ModelError(ToolchainError):
    """A retrained model directory or file is missing or malformed."""


class MissingSystemLibrary(ToolchainError):
    """A shared library a runtime needs (for example libusb-1.0-0 for tflite-support) is absent."""


class BenchError(ToolchainError):
    """A benchmark stage (run in its own process) failed; its last line says why."""


class UnsupportedLayer(ModelError):
    """A Core ML layer or op the NumPy executor does not implement: named, never skipped."""


class UnsafeModel(ModelError):
    """A model file, archive or label that could run code, reach outside itself or exhaust
    memory (``toolchain.untrusted``): refused before anything in it runs or is allocated."""


class UnverifiedModel(ModelError):
    """A model ``install`` will not put into an app: no passing verification covers its bytes
    (failed, not run, stale or never verified; ``toolchain.gate``)."""
