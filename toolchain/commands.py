"""The ``toolchain`` commands: parsed arguments → frozen options → one stage call each.

Each ``cmd_*`` validates options before any work, calls its stage, prints a short summary and
returns the exit code. Errors are raised as ToolchainError; :mod:`toolchain.cli` prints them.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from toolchain.errors import EXIT_ERROR

log = logging.getLogger("toolchain")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolchain" / "bottlenecks"


def _split(args):
    from toolchain.dataset import SplitOptions

    return SplitOptions(args.validation_percentage, args.testing_percentage)


def _distortions(args):
    from toolchain.distortions import Distortions

    return Distortions(args.flip_left_right, args.random_crop, args.random_scale,
                       args.random_brightness, args.distorted_variants)


def _training_options(args):
    from toolchain.retrain import TrainingOptions

    return TrainingOptions(
        args.how_many_training_steps, args.learning_rate, args.train_batch_size,
        args.eval_step_interval, args.validation_batch_size,
        args.print_misclassified_test_images, args.seed)


def _backbone(args):
    from toolchain import backbones

    spec = backbones.get(args.architecture)
    weights = backbones.WeightsChoice.parse(args.weights)
    backbone = backbones.load(spec, weights, args.weights_dir)
    if weights.kind == "none":
        log.warning("using random backbone weights (--weights none): the pipeline runs, but "
                    "accuracy is far below what ImageNet weights give")
    return backbone


def cmd_sample_data(args) -> int:
    from toolchain.sample_data import write_sample_data

    summary = write_sample_data(args.out_dir, per_class=args.per_class, seed=args.seed)
    verb = "wrote" if summary.created else "already up to date:"
    print(f"{verb} {summary.images} images in {len(summary.classes)} classes "
          f"({', '.join(summary.classes)}) to {summary.out_dir}")
    return 0


def cmd_bottlenecks(args) -> int:
    from toolchain.bottlenecks import BottleneckCache, extract
    from toolchain.dataset import scan
    from toolchain.retrain import bottleneck_jobs

    dataset = scan(args.image_dir, _split(args))
    backbone = _backbone(args)
    cache = BottleneckCache(args.bottleneck_dir or default_cache_dir(), backbone)
    result = extract(bottleneck_jobs(dataset, _distortions(args)), cache,
                     progress=not args.quiet)
    rate = f" at {result.images_per_second:.1f} img/s" if result.computed else ""
    print(f"bottlenecks for {backbone.spec.name}: {result.cached} cached, "
          f"{result.computed} computed{rate}, {len(dataset.skipped) + len(result.failures)} "
          f"skipped; cache {cache.dir}")
    return 0


def cmd_retrain(args) -> int:
    from toolchain.dataset import scan
    from toolchain.retrain import retrain

    options = _training_options(args)
    distortions = _distortions(args)
    dataset = scan(args.image_dir, _split(args))
    backbone = _backbone(args)
    result = retrain(dataset, backbone, args.bottleneck_dir or default_cache_dir(),
                     args.output_dir, options, distortions,
                     args.summaries_dir or args.output_dir / "summaries",
                     args.output_graph, args.output_labels, progress=not args.quiet)
    info = result.info
    accuracy = "n/a (empty test set)" if info.test_accuracy is None else f"{info.test_accuracy:.1%}"
    print(f"retrained {info.architecture} on {len(info.labels)} classes in {result.seconds:.1f} s "
          f"(bottlenecks: {result.bottlenecks_cached} cached, {result.bottlenecks_computed} "
          f"computed)")
    print(f"final test accuracy = {accuracy} (N={info.test_images}); "
          f"train accuracy {result.train_accuracy:.1%}")
    if result.skipped:
        print(f"skipped {result.skipped} file(s): listed in {result.output_dir / 'split.json'}")
    if args.print_misclassified_test_images:
        for relpath, truth, guess in result.misclassified:
            print(f"misclassified: {relpath} (true {truth}, predicted {guess})")
    print(f"model written to {result.output_dir}")
    return 0


def _graph_options(args):
    from toolchain.convert import GraphOptions

    return GraphOptions(args.input_name, args.output_name, args.input_mean, args.input_std)


def _target_jobs(args):
    import targets

    return [(target, target.options(args)) for target in targets.resolve(args.targets)]


def _metadata(args):
    from targets import ArtifactMetadata

    return ArtifactMetadata(args.name, args.description, args.author, args.license,
                            args.model_version)


def _report(conversions) -> int:
    """One line per artifact; each failure in one line naming the target; non-zero if any."""
    for item in conversions:
        if item.ok:
            print(f"{item.target}: wrote {item.path} ({_size(item.path)}, {item.seconds:.1f} s)")
        else:
            print(f"toolchain: error: target {item.target} failed: {item.error}", file=sys.stderr)
    return 0 if all(item.ok for item in conversions) else EXIT_ERROR


def _size(path: Path) -> str:
    from targets import artifact_bytes

    return f"{artifact_bytes(path) / 1e6:.2f} MB"


def cmd_convert(args) -> int:
    from toolchain.convert import convert, source_from_graph, source_from_model
    from toolchain.errors import UsageError
    from toolchain.label import graph_labels_path

    if (args.model is None) == (args.graph is None):
        raise UsageError("pass exactly one of --model and --graph")
    jobs = _target_jobs(args)
    if args.graph is not None:
        source = source_from_graph(args.graph, graph_labels_path(args.graph, args.labels),
                                   _graph_options(args), args.image_dir)
        out = args.output_dir or args.graph.parent
    else:
        source = source_from_model(args.model, args.image_dir)
        out = args.output_dir or args.model
    return _report(convert(source, jobs, _metadata(args), out))


def _verify_options(args):
    from toolchain.verify import Threshold, Thresholds, VerifyOptions

    def limit(precision: str) -> Threshold:
        return Threshold(getattr(args, f"{precision}_agreement"),
                         getattr(args, f"{precision}_max_diff"))

    return VerifyOptions(Thresholds(limit("float32"), limit("float16"), limit("int8")),
                         allow_skip=args.allow_skip)


def _verified(report, folder: Path) -> int:
    """Print one line per check and where the reports are; the verifier's exit code."""
    from toolchain import report as report_io

    written = report_io.write(report, folder)
    print(f"verified on {len(report.images)} held-out images "
          f"(original accuracy {report.original_accuracy:.1%}):")
    for check in report.checks:
        figures = ("" if check.top1_agreement is None else
                   f" agreement {check.top1_agreement:.4f}, max abs diff "
                   f"{check.max_abs_diff:.2e},")
        reason = f": {check.reason}" if check.reason else ""
        print(f"  {check.status.upper():7} {check.name} ({check.precision}){figures.rstrip(',')}"
              f"{reason}")
    verdict = "passed" if report.passed else "FAILED"
    print(f"verification {verdict}; reports: {written['markdown']}, {written['json']}, "
          f"{written['junit']}")
    return report.exit_code


def cmd_verify(args) -> int:
    from toolchain.verify import held_out, verify

    options = _verify_options(args)
    held = held_out(args.image_dir, args.model)
    report = verify(args.model, args.artifacts, held, options)
    return _verified(report, args.report_dir or Path(args.artifacts[0]).parent)


def cmd_build(args) -> int:
    from toolchain.build import build, verify_build
    from toolchain.dataset import scan

    jobs = _target_jobs(args)  # every option is checked before any work
    checks = _verify_options(args)
    options = _training_options(args)
    distortions = _distortions(args)
    dataset = scan(args.image_dir, _split(args))
    result = build(dataset, _backbone(args), args.bottleneck_dir or default_cache_dir(),
                   args.output_dir, jobs, _metadata(args), options, distortions,
                   progress=not args.quiet)
    info = result.retrained.info
    accuracy = "n/a" if info.test_accuracy is None else f"{info.test_accuracy:.1%}"
    print(f"retrained {info.architecture}: test accuracy {accuracy} (N={info.test_images}); "
          f"model in {result.output_dir / 'model'}")
    if result.retrained.skipped:
        print(f"skipped {result.retrained.skipped} file(s), each named with its reason in "
              f"{result.output_dir / 'model' / 'split.json'}")
    code = _report(result.conversions)
    written = [item.path for item in result.conversions if item.ok]
    if not written:
        return code
    verified = _verified(verify_build(result, dataset, checks), result.output_dir)
    return code or verified


def cmd_label(args) -> int:
    from toolchain.label import classify

    predictions = classify(args.model, args.image, args.top_k, args.labels, _graph_options(args))
    for prediction in predictions:
        print(f"{prediction.label} (score = {prediction.score:.5f})")
    return 0


def cmd_install(args) -> int:
    from toolchain.install import install

    done = install(args.app, args.source, args.apps_dir)
    shown = ", ".join(done.labels[:6]) + (f", ... ({len(done.labels)} in all)"
                                          if len(done.labels) > 6 else "")
    print(f"installed {done.source} as {done.destination}")
    print(f"labels read from the model: {shown}; input {done.input_size}x{done.input_size} px")
    if args.app == "ios":
        print(f"next: open {done.project} in Xcode and run")
    else:
        print(f"next: open {done.project} in Android Studio and run (or ./gradlew installDebug)")
    return 0


def cmd_bench(args) -> int:
    from toolchain.bench import run_bench

    return run_bench(args)


COMMANDS = {"sample-data": cmd_sample_data, "bottlenecks": cmd_bottlenecks,
            "retrain": cmd_retrain, "convert": cmd_convert, "build": cmd_build,
            "verify": cmd_verify, "label": cmd_label, "install": cmd_install,
            "bench": cmd_bench}


