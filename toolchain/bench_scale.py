"""``toolchain bench --scale``: what each stage costs as the image folder grows.

For each size (default 1,000, 10,000 and 60,000 images: CIFAR-10's count), on folders of small
photos (32x32 PNGs, CIFAR-10-sized, upscaled to the backbone's input by the one image loader as
CIFAR users do), one run on this machine:

- ``scan``: seconds to list the folder and split it (toolchain.dataset.scan);
- ``extract``: cold-cache extraction as ``toolchain bottlenecks`` runs it (vectors written, not
  held), images/s (the engine built beforehand, once per weights);
- ``warm``: the same extraction again right after (same process), every vector read from the
  cache, seconds;
- ``retrain``: seconds for ``--steps`` training steps on the cached bottlenecks, model folder
  written, and the time of one step;
- ``+MB``: each stage runs in its own child process, which takes its resident memory after
  importing TensorFlow and loading the backbone, resets the kernel's peak count (Linux
  ``clear_refs``; elsewhere the peak includes the imports), runs the stage and reads the peak
  (``VmHWM``, shown for retraining as ``peak MB``); ``+MB`` is the difference, the stage's own
  growth. Beside retraining's, ``matrix MB``: the bottleneck matrix (images x bottleneck size x
  4 bytes), the least any in-memory trainer needs;
- ``cache MB``: bytes of the cache entries on disk.

The smaller folders are hard links into the largest one, so every size sees the same kind of
files. Nothing here asserts a timing; the goals are printed beside the measured figures.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_SIZES = (1000, 10000, 60000)
CLASSES = ("red", "green", "blue", "grey", "yellow", "violet", "cyan", "orange", "pink", "brown")
_COLOURS = np.array([[200, 40, 40], [40, 170, 60], [40, 60, 200], [128, 128, 128],
                     [220, 210, 50], [140, 60, 170], [50, 200, 210], [240, 140, 30],
                     [240, 150, 190], [120, 80, 40]], np.float32)
GOALS = {"extraction at the largest size / at the smallest": ">= 0.9x",
         "scan of 60k files": "a few seconds",
         "retrain peak growth beyond the bottleneck matrix": "flat in the number of images",
         "training step": "flat in the number of images"}


def write_photos(root: Path, count: int, seed: int = 0) -> None:
    """``count`` 32x32 PNGs in 10 class folders: a class colour, texture and noise each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = index % len(CLASSES)
        base = _COLOURS[label] * rng.uniform(0.6, 1.2)
        pixels = base + rng.normal(0, 30, (32, 32, 3))
        pixels += 40 * np.sin(np.arange(32) * rng.uniform(0.1, 1.0))[:, None, None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(root / CLASSES[label] / f"{index:06d}.png", compress_level=1)


def linked_subset(source: Path, target: Path, count: int) -> None:
    """The first ``count`` images of ``source`` (by name, across classes) as hard links."""
    per_class = -(-count // len(CLASSES))
    for name in CLASSES:
        (target / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / name).iterdir())[:per_class]:
            os.link(path, target / name / path.name)


def _stage(stage: str, arguments: dict) -> dict:
    """Run one stage in a child process; what it reported (its figures and memory)."""
    done = subprocess.run([sys.executable, "-m", "toolchain.bench_scale", stage,
                           json.dumps(arguments)], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False)
    if done.returncode != 0:
        from toolchain.errors import BenchError

        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"bench --scale: the {stage} stage failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """This process's resident memory now, MB (0 where /proc is absent)."""
    return _status_mb("VmRSS") or 0.0


def _reset_peak() -> bool:
    """Start the peak-memory count afresh (Linux: ``5`` in ``/proc/self/clear_refs`` resets
    ``VmHWM``), so the peak read at the end is the stage's, not TensorFlow's import's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mb() -> float:
    """The highest resident memory since :func:`_reset_peak` (else since the process began)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB else


def _child(stage: str, arguments: dict) -> dict:
    """One stage, in this (child) process."""
    import tensorflow as tf  # noqa: F401 (imported before the baseline is taken)

    from toolchain import backbones
    from toolchain.cache import BottleneckCache, Job, extract
    from toolchain.dataset import scan

    backbone = backbones.load(backbones.get(arguments["architecture"]),
                              backbones.WeightsChoice("none"))
    baseline = _rss_mb()
    reset = _reset_peak()
    start = time.perf_counter()
    dataset = scan(Path(arguments["images"]))
    figures: dict = {"scan_seconds": time.perf_counter() - start}
    if stage == "extract":
        cache = BottleneckCache(Path(arguments["cache"]), backbone)
        jobs = [Job(entry.path) for entry in dataset.entries]
        result = extract(jobs, cache, progress=False, keep=False)  # as `toolchain bottlenecks`
        figures.update(seconds=result.seconds, computed=result.computed,
                       images_per_second=result.images_per_second)
        begun = time.perf_counter()
        warm = extract(jobs, cache, progress=False, keep=False)  # every vector read back
        figures.update(warm_seconds=time.perf_counter() - begun, warm_cached=warm.cached)
    elif stage == "retrain":
        from toolchain.training import TrainingOptions, retrain

        options = TrainingOptions(how_many_training_steps=arguments["steps"],
                                  eval_step_interval=max(1, arguments["steps"] // 4))
        begun = time.perf_counter()
        done = retrain(dataset, backbone, cache_dir=Path(arguments["cache"]),
                       output_dir=Path(arguments["output"]), training=options, progress=False,
                       require_cached=True)
        figures.update(seconds=time.perf_counter() - begun, train_seconds=done.train_seconds,
                       bottleneck_size=backbone.bottleneck_size, images=len(dataset.entries))
    figures.update(baseline_mb=baseline, peak_mb=_peak_mb(), peak_is_the_stages=reset)
    return figures


def _cache_mb(root: Path) -> float:
    return sum(path.stat().st_size for path in root.rglob("*.bn")) / 1e6


def bench_scale(work: Path, sizes: tuple[int, ...], architecture: str, steps: int) -> list[dict]:
    """Every figure for every size, smallest first."""
    from toolchain import backbones
    from toolchain.cache import BottleneckCache, default_workers
    from toolchain.engine import choose_runtime, load_engine

    sizes = tuple(sorted(sizes))
    largest = work / f"photos-{sizes[-1]}"
    start = time.perf_counter()
    write_photos(largest, sizes[-1])
    print(f"wrote {sizes[-1]} photos in {time.perf_counter() - start:.1f} s", flush=True)
    backbone = backbones.load(backbones.get(architecture), backbones.WeightsChoice("none"))
    engines = BottleneckCache(work / "engines", backbone)
    load_engine(engines)
    choose_runtime(engines, default_workers())
    rows = []
    for size in sizes:
        folder = largest if size == sizes[-1] else work / f"photos-{size}"
        if folder != largest:
            linked_subset(largest, folder, size)
        cache = work / f"cache-{size}"
        (cache / "engines").mkdir(parents=True)
        for path in (engines.root / "engines").iterdir():
            os.link(path, cache / "engines" / path.name)
        arguments = {"architecture": architecture, "images": str(folder), "cache": str(cache),
                     "steps": steps, "output": str(work / f"model-{size}")}
        cold = _stage("extract", arguments)
        trained = _stage("retrain", arguments)
        matrix_mb = trained["images"] * trained["bottleneck_size"] * 4 / 1e6
        rows.append({"images": trained["images"], "scan_seconds": cold["scan_seconds"],
                     "extract_images_per_second": cold["images_per_second"],
                     "extract_peak_mb": cold["peak_mb"], "extract_growth_mb":
                     cold["peak_mb"] - cold["baseline_mb"], "warm_seconds": cold["warm_seconds"],
                     "retrain_seconds": trained["seconds"],
                     "step_ms": 1000 * trained["train_seconds"] / steps,
                     "retrain_peak_mb": trained["peak_mb"],
                     "retrain_growth_mb": trained["peak_mb"] - trained["baseline_mb"],
                     "bottleneck_size": trained["bottleneck_size"],
                     "bottleneck_matrix_mb": matrix_mb, "cache_mb": _cache_mb(cache)})
        print(format_scale(rows[-1:], header=len(rows) == 1), flush=True)
    return rows


def format_scale(rows: list[dict], header: bool = True) -> str:
    columns = [("images", "images", "{:.0f}"), ("scan s", "scan_seconds", "{:.2f}"),
               ("extract img/s", "extract_images_per_second", "{:.1f}"),
               ("warm s", "warm_seconds", "{:.2f}"), ("retrain s", "retrain_seconds", "{:.1f}"),
               ("step ms", "step_ms", "{:.2f}"), ("extract +MB", "extract_growth_mb", "{:.0f}"),
               ("retrain +MB", "retrain_growth_mb", "{:.0f}"),
               ("matrix MB", "bottleneck_matrix_mb", "{:.1f}"),
               ("peak MB", "retrain_peak_mb", "{:.0f}"), ("cache MB", "cache_mb", "{:.1f}")]
    widths = [max(len(title), 7) + 2 for title, _, _ in columns]
    lines = ["".join(f"{title:>{width}}" for (title, _, _), width in zip(columns, widths))
             ] if header else []
    for row in rows:
        lines.append("".join(f"{form.format(row[key]):>{width}}"
                             for (_, key, form), width in zip(columns, widths)))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The goals, and the measured figure each is judged by."""
    first, last = rows[0], rows[-1]
    ratio = last["extract_images_per_second"] / max(first["extract_images_per_second"], 1e-9)
    beyond = [row["retrain_growth_mb"] - row["bottleneck_matrix_mb"] for row in rows]
    return "\n".join([
        f"extraction at {last['images']} / at {first['images']}: {ratio:.2f}x "
        f"(goal {GOALS['extraction at the largest size / at the smallest']})",
        f"scan of {last['images']} files: {last['scan_seconds']:.2f} s "
        f"(goal: {GOALS['scan of 60k files']})",
        "retrain peak growth beyond the bottleneck matrix, MB: "
        + ", ".join(f"{value:.0f}" for value in beyond)
        + f" (goal: {GOALS['retrain peak growth beyond the bottleneck matrix']})",
        "training step, ms: " + ", ".join(f"{row['step_ms']:.2f}" for row in rows)
        + f" (goal: {GOALS['training step']})"])


def main(argv: list[str]) -> int:
    print(json.dumps(_child(argv[0], json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
