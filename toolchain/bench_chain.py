"""``toolchain bench``, the whole chain: retraining, conversion, artifacts, latency, agreement.

For one architecture, on one image folder, in one run on this machine:

- ``retrain``: seconds for ``--steps`` training steps (retrain.py's 4,000 by default) on cached
  bottlenecks, writing the model folder included; the bottlenecks are extracted once before;
- ``convert``: seconds per target and variant (Core ML NeuralNetwork ``.mlmodel`` and ML
  Program ``.mlpackage``, each with float32, float16 and int8 weights; TFLite float32, float16,
  dynamic and int8);
- ``size``: bytes of each artifact (a ``.mlpackage`` counts every file in it), and its ratio to
  the float32 TFLite;
- ``latency``: one image per call, median and 90th percentile, each artifact in its runtime
  through the verifier's runners (TFLite's interpreter with 1 and 2 threads; Core ML on macOS,
  else the NumPy executor, which is a reference, not a device speed) and the Keras model itself;
- ``agreement`` and ``accuracy`` of each artifact on the held-out split, from the verifier.

Timings are medians over ``--repeats`` runs (latency over ``--latency-runs`` calls). Nothing is
asserted: these are measurements.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain import backbones

#: (target, options) of every artifact timed, in table order.
VARIANTS = (*(("coreml", {"format": fmt, "precision": precision})
              for fmt in ("neuralnetwork", "mlprogram")
              for precision in ("float32", "float16", "int8")),
            *(("tflite", {"variant": variant})
              for variant in ("float32", "float16", "dynamic", "int8")))
#: Fewer calls where a call is slow: the NumPy Core ML executor runs at NumPy speed.
SLOW_RUNTIME_CALLS = 10


@dataclass(frozen=True, kw_only=True)
class ChainOptions:
    """What the chain benchmark runs: architecture, weights, steps, repeats, latency calls."""

    architecture: str = "mobilenet_0.50_224"
    weights: str = "none"
    steps: int = 4000
    repeats: int = 3
    latency_runs: int = 50

    def __post_init__(self) -> None:
        from toolchain.errors import UsageError

        backbones.get(self.architecture)  # an unknown name fails here, before any work
        if self.steps < 1 or self.repeats < 1 or self.latency_runs < 2:
            raise UsageError("--steps and --repeats must be at least 1, --latency-runs at least 2")


def _median_seconds(function, repeats: int) -> tuple[float, object]:
    """Median wall-clock seconds of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _percentiles(call, runs: int) -> dict[str, float]:
    """Median and 90th percentile of ``call()`` in milliseconds, after two warm-up calls."""
    call()
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90)),
            "calls": runs}


def _latencies(target, path: Path, pixels: np.ndarray, runs: int) -> dict[str, dict]:
    """Per-runtime latency of one artifact, one image per call, through the verifier's runners."""
    if target.name == "tflite":
        from targets.tflite import interpreter_runner

        found = {}
        for threads in (1, 2):
            with interpreter_runner(path, threads) as runner:
                found[f"tflite {threads}T"] = _percentiles(lambda r=runner: r(pixels[None]),
                                                           runs)
        return found
    found = {}
    with target.runners(path) as runners:
        for runner in runners:
            if runner.compute:  # an emulated device row: its speed is not the device's
                continue
            calls = runs if runner.runtime == "coreml" else min(runs, SLOW_RUNTIME_CALLS)
            found[runner.runtime] = _percentiles(lambda r=runner: r(pixels[None]), calls)
    return found


def _artifacts(source, pixels, out: Path, options: ChainOptions) -> list[dict]:
    """One row per artifact of every variant: its conversion time (median of the repeats),
    bytes and latencies on ``pixels``; a companion (TFLite's model_int8_mixed.tflite) gets its
    own row, its conversion time part of the artifact's that wrote it."""
    import targets
    from toolchain.conversion import convert

    artifacts = []
    for name, values in VARIANTS:
        target = targets.get(name)
        chosen = _options(target, values)
        seconds, results = _median_seconds(
            lambda t=target, c=chosen, o=out: convert(source, [(t, c)], _metadata(), o),
            options.repeats)
        for index, conversion in enumerate(results):
            row = {"target": name, "options": values,
                   "file": conversion.path.name if conversion.ok else target.filename(chosen),
                   "convert_seconds": seconds if index == 0 else None, "ok": conversion.ok,
                   "error": conversion.error}
            if conversion.ok:
                row["bytes"] = targets.artifact_bytes(conversion.path)
                row["latency"] = _latencies(target, conversion.path, pixels,
                                            options.latency_runs)
                row["path"] = conversion.path
            artifacts.append(row)
    return artifacts


def _add_checks(artifacts: list[dict], report) -> None:
    """Each row's size against float32 TFLite's and its verifier checks (``report``: None
    when nothing was verified); the rows lose their paths."""
    float32 = next((row["bytes"] for row in artifacts
                    if row["ok"] and row["file"] == "model_float32.tflite"), None)
    for row in artifacts:
        path = row.pop("path", None)
        if float32 and "bytes" in row:
            row["size_vs_float32_tflite"] = row["bytes"] / float32
        row["checks"] = [] if report is None else [
            {"runtime": check.runtime, "status": check.status,
             "agreement": check.top1_agreement, "accuracy": check.accuracy,
             "max_abs_diff": check.max_abs_diff}
            for check in report.checks if path is not None and check.path == path]


def bench_chain(image_dir: Path, work: Path, options: ChainOptions) -> dict:
    """Every whole-chain figure; see the module docstring."""
    from toolchain.cache import BottleneckCache, extract
    from toolchain.conversion import source_from_model
    from toolchain.dataset import scan
    from toolchain.distortions import Distortions
    from toolchain.images import load_rgb
    from toolchain.training import TrainingOptions, bottleneck_jobs, retrain
    from toolchain.verification import HeldOut, VerifyOptions, verify

    spec = backbones.get(options.architecture)
    backbone = backbones.load(spec, backbones.WeightsChoice.parse(options.weights))
    dataset = scan(image_dir)
    cache_dir, model_dir = work / "cache", work / "model"
    start = time.perf_counter()
    extract(bottleneck_jobs(dataset, Distortions()), BottleneckCache(cache_dir, backbone),
            progress=False)
    extraction_seconds = time.perf_counter() - start
    training = TrainingOptions(how_many_training_steps=options.steps)
    retrain_seconds, retrained = _median_seconds(
        lambda: retrain(dataset, backbone, cache_dir=cache_dir, output_dir=model_dir,
                        training=training, progress=False),
        options.repeats)

    source = source_from_model(model_dir)
    held = tuple(dataset.subset("testing"))
    pixels = load_rgb(held[0].path if held else dataset.entries[0].path, spec.input_size)
    artifacts = _artifacts(source, pixels, work / "artifacts", options)
    preprocessed = spec.preprocessing.apply(pixels[None])
    keras_latency = _percentiles(
        lambda: source.keras_model(preprocessed, training=False).numpy(), options.latency_runs)
    written = [row["path"] for row in artifacts if row["ok"]]
    report = verify(model_dir, written, HeldOut(held, dataset.root), VerifyOptions()) \
        if held and written else None
    _add_checks(artifacts, report)
    return {
        "architecture": spec.name, "weights": options.weights, "images": len(dataset.entries),
        "held_out": len(held), "steps": options.steps, "repeats": options.repeats,
        "extraction_seconds_cold": extraction_seconds, "retrain_seconds": retrain_seconds,
        "test_accuracy": retrained.info.test_accuracy,
        "original_accuracy": None if report is None else report.original_accuracy,
        "keras_latency": keras_latency, "artifacts": artifacts,
    }


def _options(target, values: dict):
    return target.options_class(**values)


def _metadata():
    from targets import ArtifactMetadata

    return ArtifactMetadata(name="Benchmark", description="toolchain bench", author="toolchain",
                            license="", version="1")


def _number(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_chain(result: dict) -> str:
    """The chain's figures as a plain-text table."""
    lines = [f"Whole chain: {result['architecture']} (--weights {result['weights']}), "
             f"{result['images']} images, {result['held_out']} held out; "
             f"medians of {result['repeats']} runs",
             f"bottleneck extraction, cold cache       {result['extraction_seconds_cold']:8.1f} s",
             f"retrain, {result['steps']} steps on cached bottlenecks "
             f"{result['retrain_seconds']:6.1f} s",
             "",
             f"{'artifact':<24}{'convert s':>10}{'MB':>8}{'vs f32':>8}  {'runtime':<20}"
             f"{'p50 ms':>9}{'p90 ms':>9}{'agree':>8}{'acc':>8}"]
    for row in result["artifacts"]:
        name = row["file"]
        if not row["ok"]:
            lines.append(f"{name:<24}{_number(row['convert_seconds'], '.1f'):>10}  failed: "
                         f"{row['error']}")
            continue
        head = (f"{name:<24}{_number(row['convert_seconds'], '.1f'):>10}"
                f"{row['bytes'] / 1e6:>8.2f}"
                f"{_number(row.get('size_vs_float32_tflite'), '.2f'):>7}x")
        checks = {check["runtime"]: check for check in row["checks"]}
        fallback = next(iter(checks.values()), {})
        for index, (runtime, latency) in enumerate(row["latency"].items()):
            check = checks.get(runtime) or (fallback if runtime.startswith("tflite") else {})
            lines.append((head if index == 0 else " " * len(head))
                         + f"  {runtime:<20}{latency['median_ms']:>9.2f}{latency['p90_ms']:>9.2f}"
                         + f"{_number(check.get('agreement'), '.4f'):>8}"
                         + f"{_number(check.get('accuracy'), '.3f'):>8}")
    keras = result["keras_latency"]
    lines.append(f"{'keras model (original)':<24}{'':>10}{'':>8}{'':>8}  {'keras':<20}"
                 f"{keras['median_ms']:>9.2f}{keras['p90_ms']:>9.2f}{'':>8}"
                 f"{_number(result['original_accuracy'], '.3f'):>8}")
    return "\n".join(lines)
