"""The ``toolchain`` command line.

Dashes are canonical; retrain.py's underscore spellings (``--image_dir``,
``--how_many_training_steps``, ``--output_graph``, ...) are accepted as aliases by rewriting
them before parsing, so ``--help`` stays readable. Every :class:`ToolchainError` becomes one
line (and a hint) with a non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from toolchain import __version__
from toolchain.errors import EXIT_INTERRUPTED, ToolchainError

log = logging.getLogger("toolchain")

DEFAULT_ARCHITECTURE = "mobilenet_0.50_224"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolchain" / "bottlenecks"


def _normalize(argv: list[str]) -> list[str]:
    """Turn retrain.py's ``--under_score[=v]`` spellings into ``--under-score[=v]``."""
    out = []
    for index, token in enumerate(argv):
        if token == "--":
            return out + argv[index:]
        if token.startswith("--") and "_" in token.split("=", 1)[0]:
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        out.append(token)
    return out


def _add_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--image-dir", type=Path, required=True,
                       help="folder with one sub-folder of images per class")
    group.add_argument("--validation-percentage", type=float, default=10.0,
                       help="percent of images held out for validation (default 10)")
    group.add_argument("--testing-percentage", type=float, default=10.0,
                       help="percent of images held out for testing (default 10)")


def _add_backbone(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone and cache")
    group.add_argument("--architecture", default=DEFAULT_ARCHITECTURE,
                       help="mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>, inception_v3, "
                            "mobilenet_v2_<alpha>_<size>, mobilenet_v3_<small|large>_<size> "
                            f"(default {DEFAULT_ARCHITECTURE})")
    group.add_argument("--weights", default="imagenet",
                       help="imagenet (Keras' cache ~/.keras/models, downloaded if absent), none "
                            "(seeded random weights, for offline tests), or a .h5 file")
    group.add_argument("--model-dir", "--weights-dir", dest="weights_dir", type=Path,
                       help="folder holding ImageNet weight files (default ~/.keras/models)")
    group.add_argument("--bottleneck-dir", type=Path, default=None,
                       help=f"bottleneck cache (default {default_cache_dir()})")
    group.add_argument("--flip-left-right", action="store_true",
                       help="train on randomly mirrored variants of the training images")
    group.add_argument("--random-crop", type=float, default=0.0, metavar="PERCENT",
                       help="margin to crop at random from the training images")
    group.add_argument("--random-scale", type=float, default=0.0, metavar="PERCENT",
                       help="enlarge training images at random by up to this much")
    group.add_argument("--random-brightness", type=float, default=0.0, metavar="PERCENT",
                       help="change training images' brightness at random by up to this much")
    group.add_argument("--distorted-variants", type=int, default=5, metavar="N",
                       help="distorted variants cached per training image (default 5)")


def _add_training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (retrain.py's flags)")
    group.add_argument("--how-many-training-steps", type=int, default=4000)
    group.add_argument("--learning-rate", type=float, default=0.01)
    group.add_argument("--train-batch-size", type=int, default=100)
    group.add_argument("--eval-step-interval", type=int, default=10)
    group.add_argument("--validation-batch-size", type=int, default=100,
                       help="validation images per evaluation (-1: all)")
    group.add_argument("--print-misclassified-test-images", action="store_true")
    group.add_argument("--seed", type=int, default=0, help="seed for batch sampling (default 0)")
    group.add_argument("--summaries-dir", type=Path,
                       help="TensorBoard summaries (default OUTPUT_DIR/summaries)")
    group.add_argument("--output-graph", type=Path,
                       help="also write a frozen TF-for-Poets graph (input, final_result) here")
    group.add_argument("--output-labels", type=Path, help="also write the labels here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolchain",
        description="Retrain the last layer of an ImageNet backbone on your photos and export "
                    "on-device classifiers.")
    parser.add_argument("--version", action="version", version=f"toolchain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or information")
    # The same flags after the command name; SUPPRESS keeps the top-level value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or information")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = commands.add_parser

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kwargs)

    commands.add_parser = add_command

    sample = commands.add_parser("sample-data", help="write the built-in demo dataset")
    sample.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    sample.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    sample.add_argument("--seed", type=int, default=0)

    bottlenecks = commands.add_parser("bottlenecks", help="fill the bottleneck cache")
    _add_data(bottlenecks)
    _add_backbone(bottlenecks)

    retrain = commands.add_parser("retrain", help="retrain the last layer on cached bottlenecks")
    _add_data(retrain)
    _add_backbone(retrain)
    _add_training(retrain)
    retrain.add_argument("--output-dir", type=Path, required=True,
                         help="where the retrained model, labels.txt and the split go")

    label = commands.add_parser("label", help="classify one image")
    label.add_argument("--model", type=Path, required=True, help="a retrain output directory")
    label.add_argument("--image", type=Path, required=True)
    label.add_argument("--top-k", type=int, default=5)

    bench = commands.add_parser("bench", help="measure bottleneck extraction speed")
    bench.add_argument("--architecture", action="append", dest="architectures",
                       help="repeatable (default mobilenet_v2_1.0_224)")
    bench.add_argument("--image-dir", type=Path, help="images to use (default: sample data)")
    bench.add_argument("--images", type=int, default=480, help="images to time (default 480)")
    bench.add_argument("--repeats", type=int, default=3, help="runs per figure; median shown")
    bench.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def _split(args):
    from toolchain.dataset import SplitOptions

    return SplitOptions(args.validation_percentage, args.testing_percentage)


def _distortions(args):
    from toolchain.distortions import Distortions

    return Distortions(args.flip_left_right, args.random_crop, args.random_scale,
                       args.random_brightness, args.distorted_variants)


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
    from toolchain.retrain import _jobs

    dataset = scan(args.image_dir, _split(args))
    backbone = _backbone(args)
    cache = BottleneckCache(args.bottleneck_dir or default_cache_dir(), backbone)
    result = extract(_jobs(dataset, _distortions(args)), cache, progress=not args.quiet)
    rate = f" at {result.images_per_second:.1f} img/s" if result.computed else ""
    print(f"bottlenecks for {backbone.spec.name}: {result.cached} cached, "
          f"{result.computed} computed{rate}, {len(dataset.skipped) + len(result.failures)} "
          f"skipped; cache {cache.dir}")
    return 0


def cmd_retrain(args) -> int:
    from toolchain.dataset import scan
    from toolchain.retrain import TrainingOptions, retrain

    options = TrainingOptions(
        args.how_many_training_steps, args.learning_rate, args.train_batch_size,
        args.eval_step_interval, args.validation_batch_size,
        args.print_misclassified_test_images, args.seed)
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


def cmd_label(args) -> int:
    from toolchain.label import classify

    for prediction in classify(args.model, args.image, args.top_k):
        print(f"{prediction.label} (score = {prediction.score:.5f})")
    return 0


def cmd_bench(args) -> int:
    from toolchain.bench import run_bench

    return run_bench(args)


COMMANDS = {"sample-data": cmd_sample_data, "bottlenecks": cmd_bottlenecks,
            "retrain": cmd_retrain, "label": cmd_label, "bench": cmd_bench}


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"toolchain: {record.levelname.lower()}: {record.getMessage()}"


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)  # TFLite converter deprecation notices


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalize(list(sys.argv[1:] if argv is None else argv)))
    _configure_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except ToolchainError as error:
        if args.debug:
            raise
        print(f"toolchain: error: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("toolchain: interrupted; everything written so far is complete and kept",
              file=sys.stderr)
        return EXIT_INTERRUPTED
