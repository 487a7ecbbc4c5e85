"""``toolchain bench``: measured figures for bottleneck extraction, printed as one table.

For each architecture, in one run on this machine (so ratios compare like with like):

- ``toolchain``: end-to-end extraction on a cold cache (hash, decode, resize, backbone, cache
  write), wall-clock, the engine already built (it is built once per weights), with its
  default of one worker per core;
- ``warm cache``: the same images again, every vector read from the cache;
- ``xnnpack 2T``: the backbone alone as float32 TFLite under XNNPACK, 2 threads, on
  pre-decoded inputs: the practical limit on this CPU;
- ``tf batched``: the backbone alone in TensorFlow, ``tf.function`` on batches of 32;
- ``predict loop``: ``model.predict`` on one image per call, as retrain.py ran it.

Each figure is the median of ``--repeats`` runs. These are benchmarks, not tests: nothing here
asserts a timing; the goals are printed beside the measured ratios.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from toolchain import atomic, backbones
from toolchain.cache import BottleneckCache, Engine, Job, default_workers, extract
from toolchain.dataset import scan
from toolchain.engine import choose_runtime, load_engine
from toolchain.errors import UsageError
from toolchain.images import load_rgb

DEFAULT_ARCHITECTURES = ("mobilenet_0.50_224", "mobilenet_v2_1.0_224", "inception_v3")
PREDICT_LOOP_IMAGES = 24
GOALS = {"toolchain / xnnpack 2T": 0.6, "toolchain / predict loop": 10.0}


def _interleaved_rates(runs: dict, repeats: int) -> dict[str, float]:
    """Images/s per named ``(function, image count)``: medians over repeats taken in turn.

    The machines are noisy and their speed drifts; running the contenders alternately, rather
    than one after the other, keeps each ratio a comparison made under the same conditions.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, _count) in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: runs[name][1] / statistics.median(times[name]) for name in runs}


def bench_architecture(name: str, paths: list[Path], repeats: int, work: Path) -> dict:
    """Every extraction figure for one architecture."""
    import tensorflow as tf

    spec = backbones.get(name)
    backbone = backbones.load(spec, backbones.WeightsChoice("none"))
    seed_cache = BottleneckCache(work / "engine", backbone)
    start = time.perf_counter()
    load_engine(seed_cache)
    choice = choose_runtime(seed_cache, default_workers())  # measured once, as a user's first run
    engine_seconds = time.perf_counter() - start

    def cold_run():
        root = work / "cold"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(seed_cache.root / "engines", root / "engines")  # engine and its runtime
        result = extract([Job(p) for p in paths], BottleneckCache(root, backbone), progress=False)
        if result.failures:
            raise UsageError(f"{len(result.failures)} benchmark images cannot be decoded, e.g. "
                             f"{next(iter(result.failures))}", hint="clean the --image-dir")

    pixels = np.stack([spec.preprocessing.apply(load_rgb(p, spec.input_size)) for p in paths])
    engine = Engine(seed_cache.engine_path, threads=2)
    engine(pixels[:1])  # XNNPACK packs weights on the first call: not part of the limit

    def xnnpack_run():
        for image in pixels:
            engine(image[None])

    batched = tf.function(lambda x: backbone.model(x, training=False))
    batched(pixels[:32])

    def tf_run():
        for begin in range(0, len(pixels), 32):
            batched(pixels[begin:begin + 32]).numpy()

    few = pixels[:PREDICT_LOOP_IMAGES]
    backbone.model.predict(few[:1], verbose=0)

    def predict_run():
        for image in few:
            backbone.model.predict(image[None], verbose=0)

    warm = BottleneckCache(work / "cold", backbone)
    rates = _interleaved_rates({
        "toolchain": (cold_run, len(paths)),
        # right after a cold run, so the cache is full
        "warm cache": (lambda: extract([Job(p) for p in paths], warm, progress=False), len(paths)),
        "xnnpack 2T": (xnnpack_run, len(paths)),
        "tf batched": (tf_run, len(paths)),
        "predict loop": (predict_run, len(few))}, repeats)
    return {
        "architecture": spec.name, "images": len(paths), "engine_build_seconds": engine_seconds,
        "runtime": choice.runtime,
        "images_per_second": rates,
        "ratios": {"toolchain / xnnpack 2T": rates["toolchain"] / rates["xnnpack 2T"],
                   "toolchain / predict loop": rates["toolchain"] / rates["predict loop"],
                   "toolchain / tf batched": rates["toolchain"] / rates["tf batched"],
                   "warm cache / toolchain": rates["warm cache"] / rates["toolchain"]},
    }


def _machine() -> dict:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def format_table(results: list[dict]) -> str:
    """The figures as a plain-text table, goals beside the ratios they apply to."""
    columns = ["toolchain", "warm cache", "xnnpack 2T", "tf batched", "predict loop"]
    lines = ["Bottleneck extraction, images/s (median; --weights none: same FLOPs as ImageNet)",
             f"{'architecture':<24}" + "".join(f"{c:>14}" for c in columns)]
    for result in results:
        rates = result["images_per_second"]
        lines.append(f"{result['architecture']:<24}"
                     + "".join(f"{rates[c]:>14.1f}" for c in columns))
    lines.append("")
    lines.append(f"{'ratio':<34}" + "".join(f"{r['architecture']:>24}" for r in results)
                 + "    goal")
    for ratio in results[0]["ratios"]:
        goal = GOALS.get(ratio)
        lines.append(f"{ratio:<34}" + "".join(f"{r['ratios'][ratio]:>23.2f}x" for r in results)
                     + (f"    >= {goal:g}x" if goal else ""))
    lines.append("engine build and runtime choice (once per weights), s  "
                 + "  ".join(f"{r['architecture']}: {r['engine_build_seconds']:.1f}"
                             for r in results))
    lines.append("runtime chosen for extraction  "
                 + "  ".join(f"{r['architecture']}: {r['runtime']}" for r in results))
    return "\n".join(lines)


def run_bench(args) -> dict:
    """The ``toolchain bench`` command (``args``: a validated ``commands.BenchCommand``):
    extraction figures, then the whole chain's, each table printed when measured."""
    from toolchain.bench_chain import ChainOptions, bench_chain, format_chain
    from toolchain.sample_photos import write_sample_data

    names = list(args.architectures) or list(DEFAULT_ARCHITECTURES)
    chain = ChainOptions(architecture=args.chain_architecture, weights=args.weights,
                         steps=args.steps, repeats=args.repeats, latency_runs=args.latency_runs)
    report: dict = {"machine": _machine()}
    if args.scale:
        return _scale(args, report)
    with tempfile.TemporaryDirectory(prefix="toolchain-bench-") as tmp:
        work = Path(tmp)
        image_dir = args.image_dir
        if image_dir is None:
            image_dir = work / "photos"
            write_sample_data(image_dir, per_class=max(2, -(-args.images // 6)))
        if args.only in (None, "extraction"):
            paths = [entry.path for entry in scan(image_dir).entries][: args.images]
            print(f"benchmarking extraction on {len(paths)} images from {image_dir}, "
                  f"{args.repeats} repeats", flush=True)
            report["results"] = [bench_architecture(name, paths, args.repeats, work / name)
                                 for name in names]
            print(format_table(report["results"]), flush=True)
        if args.only in (None, "chain"):
            print(f"\nbenchmarking the whole chain for {chain.architecture} on {image_dir}",
                  flush=True)
            report["chain"] = bench_chain(image_dir, work / "chain", chain)
            print(format_chain(report["chain"]))
        if args.only in (None, "mlmodel"):
            from toolchain.bench_mlmodel import bench_mlmodel, format_mlmodel

            print(f"\nbenchmarking Core ML .mlmodel conversion and parse for "
                  f"{args.mlmodel_architecture}", flush=True)
            report["mlmodel"] = bench_mlmodel(work / "mlmodel", args.mlmodel_architecture,
                                              args.weights)
            print(format_mlmodel(report["mlmodel"]))
    return _finish(args, report)


def _scale(args, report: dict) -> dict:
    """``bench --scale``: the cost of each stage against the folder's size."""
    from toolchain.bench_scale import DEFAULT_SIZES, bench_scale, summary

    sizes = tuple(args.scale_sizes) or DEFAULT_SIZES
    print(f"benchmarking scale for {args.chain_architecture} on {', '.join(map(str, sizes))} "
          f"images, {args.steps} training steps", flush=True)
    with tempfile.TemporaryDirectory(prefix="toolchain-bench-scale-") as tmp:
        report["scale"] = bench_scale(Path(tmp), sizes, args.chain_architecture, args.steps)
    print(summary(report["scale"]))
    return _finish(args, report)


def _finish(args, report: dict) -> dict:
    """The machine line, and the figures to ``--json`` when asked."""
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    if args.json:
        atomic.write_json(args.json, report)
        print(f"figures written to {args.json}")
    return report
