"""Retrain the last layer of an ImageNet backbone on your photos and export on-device classifiers.

The Python API: one function per command, taking the same options as the command's flags,
underscored (``--how-many-training-steps 500`` is ``how_many_training_steps=500``,
``--coreml-format mlprogram`` is ``coreml_format="mlprogram"``); repeatable flags take a list
under their plural name (``targets=["coreml", "tflite"]``, ``artifacts=[...]``), and ``--from``
is ``source``. Each returns a result object and raises the typed errors of
:mod:`toolchain.errors` (an unknown keyword is an :class:`UnknownOption`, also a TypeError)::

    import toolchain
    result = toolchain.build("photos", "out", architecture="mobilenet_0.50_224",
                             targets=["coreml", "tflite"])
    result.verdict       # "passed", "failed" or "inconclusive" (too few images to tell)
    result.passed        # bool: every target converted and every artifact verified
    result.artifacts     # list of Path
    result.report        # the verifier's report (report.record() is report.json's data)

The command line (:mod:`toolchain.cli`) is a thin layer over exactly these functions, through
:mod:`toolchain.commands`; ``toolchain.keywords("build")`` lists every keyword with its default.
Heavy libraries (TensorFlow, coremltools, tflite-support) are imported inside functions, so
``import toolchain`` and ``toolchain --help`` are instant. The architecture is described in
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

from pathlib import Path

from toolchain.errors import (
    BenchError,
    CacheError,
    ConversionError,
    DatasetError,
    MissingSystemLibrary,
    ModelError,
    ToolchainError,
    UnknownArchitecture,
    UnknownOption,
    UnreadableImage,
    UnsafeModel,
    UnsupportedLayer,
    UnverifiedModel,
    UsageError,
    WeightsUnavailable,
    WriteError,
)

#: The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"


def _run(command: str, values: dict):
    from toolchain import options
    from toolchain.commands import COMMANDS

    options_class, run = COMMANDS[command]
    where = f"toolchain.{command.replace('-', '_')}()"
    return run(options.build(options_class, values, where=where))


class _Required:
    """The default :func:`keywords` shows for a keyword that must be given."""

    def __repr__(self) -> str:
        return "toolchain.REQUIRED"


#: What :func:`keywords` gives as the default of a required keyword (``image_dir``).
REQUIRED = _Required()


def keywords(command: str) -> dict[str, tuple[object, str]]:
    """Every keyword the API function of ``command`` takes: ``{name: (default, help)}``
    (the default is :data:`REQUIRED` for a keyword that must be given)."""
    import dataclasses

    from toolchain import options
    from toolchain.commands import COMMANDS

    found = {}
    for leaf in options.leaves(COMMANDS[command][0]):
        text = leaf.help() if callable(leaf.help) else leaf.help
        default = REQUIRED if leaf.default is dataclasses.MISSING else leaf.default
        found[leaf.name] = (default, text)
    return found


def sample_data(out_dir: str | Path, **options):
    """Write the built-in demo dataset (``per_class``, ``seed``); a SampleDataSummary."""
    return _run("sample-data", {"out_dir": out_dir, **options})


def bottlenecks(image_dir: str | Path, **options):
    """Fill the bottleneck cache for ``image_dir`` (``architecture``, ``weights``,
    ``bottleneck_dir``, distortions, ...); a BottlenecksResult with counts."""
    return _run("bottlenecks", {"image_dir": image_dir, **options})


def retrain(image_dir: str | Path, output_dir: str | Path, **options):
    """Retrain the last layer on ``image_dir`` into ``output_dir`` (retrain.py's training
    keywords: ``how_many_training_steps``, ``learning_rate``, ``summaries_dir``,
    ``output_graph``, ...); a RetrainResult (``info``: the model's manifest)."""
    return _run("retrain", {"image_dir": image_dir, "output_dir": output_dir, **options})


def convert(model: str | Path | None = None, **options):
    """Convert a retrained model folder (or ``graph=`` a frozen ``.pb``) for ``targets``
    (``coreml_format``, ``tflite_variant``, metadata keywords, ...); a ConvertResult
    (``ok``, ``artifacts``, ``conversions`` with each failure's one-line reason)."""
    return _run("convert", {"model": model, **options})


def verify(model: str | Path, artifacts, image_dir: str | Path | None = None, **options):
    """Check ``artifacts`` against ``model`` (a retrain or build folder, a ``.pb`` with
    ``labels=``, ``input_mean=``, ... or a ``.keras`` file) on the held-out split of
    ``image_dir``, or on every photo of ``images=`` (thresholds: ``float32_agreement``, ...;
    ``min_images``, ``accept_small_set``, ``report_dir``); a VerifyResult (``verdict``,
    ``passed``, ``report``, ``files``).
    Reports are written as by the command."""
    values = {"model": model, "artifacts": artifacts, **options}
    if image_dir is not None:
        values["image_dir"] = image_dir
    return _run("verify", values)


def build(image_dir: str | Path, output_dir: str | Path = "toolchain-build", **options):
    """The whole chain: retrain, convert for ``targets``, verify, write the reports; a
    BuildResult (``verdict``, ``passed``, ``artifacts``, ``report``, ``retrained``,
    ``conversions``); ``verify_images=DIR`` verifies on every photo of DIR."""
    return _run("build", {"image_dir": image_dir, "output_dir": output_dir, **options})


def label(model: str | Path, image: str | Path, top_k: int = 5, **options):
    """The ``top_k`` labels of ``image`` by ``model`` (a retrain folder, ``.tflite``,
    ``.mlmodel``, ``.mlpackage`` or ``.pb``); a list of Prediction (``label``, ``score``)."""
    return _run("label", {"model": model, "image": image, "top_k": top_k, **options})


def install(app: str, source: str | Path, apps_dir: str | Path | None = None,
            allow_unverified: bool = False):
    """Copy the built model of ``app``'s format (``ios``, ``android``) from ``source`` into
    the sample app in ``apps_dir`` (default ``./sample_apps``), if a passing verification
    covers its bytes (else an UnverifiedModel, unless ``allow_unverified``); an Installed
    record."""
    return _run("install", {"app": app, "source": source, "apps_dir": apps_dir,
                            "allow_unverified": allow_unverified})


__all__ = ["BenchError", "CacheError", "ConversionError", "DatasetError", "MissingSystemLibrary",
           "ModelError", "ToolchainError", "UnknownArchitecture", "UnknownOption",
           "UnreadableImage", "UnsafeModel", "UnsupportedLayer", "UnverifiedModel", "UsageError",
           "WeightsUnavailable",
           "WriteError", "__version__", "bottlenecks", "build", "convert", "install", "keywords",
           "label", "retrain", "sample_data", "verify"]
