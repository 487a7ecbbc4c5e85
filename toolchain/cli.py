"""The ``toolchain`` command line: the parser, error reporting and logging.

The commands themselves are in :mod:`toolchain.commands`.

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
from toolchain.commands import COMMANDS, default_cache_dir
from toolchain.errors import EXIT_ERROR, EXIT_INTERRUPTED, ToolchainError

log = logging.getLogger("toolchain")

DEFAULT_ARCHITECTURE = "mobilenet_0.50_224"


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


def _add_graph(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("frozen graphs (.pb), with retrain.py's defaults")
    group.add_argument("--labels", type=Path,
                       help="labels file (default: retrained_labels.txt or labels.txt beside it)")
    group.add_argument("--input-name", default="input")
    group.add_argument("--output-name", default="final_result")
    group.add_argument("--input-mean", type=float, default=127.5)
    group.add_argument("--input-std", type=float, default=127.5)


def _add_targets(parser: argparse.ArgumentParser) -> None:
    import targets

    group = parser.add_argument_group("targets")
    group.add_argument("--target", action="append", dest="targets", required=True,
                       metavar="NAME", help=f"{', '.join(targets.names())} or all; repeatable")
    for name in targets.names():
        targets.get(name).add_arguments(group)
    meta = parser.add_argument_group("metadata written into every artifact")
    defaults = targets.ArtifactMetadata()
    meta.add_argument("--name", default=defaults.name)
    meta.add_argument("--description", default=defaults.description)
    meta.add_argument("--author", default=defaults.author)
    meta.add_argument("--license", default=defaults.license)
    meta.add_argument("--model-version", default=defaults.version)


def _add_verification(parser: argparse.ArgumentParser) -> None:
    from toolchain.verify import Thresholds

    group = parser.add_argument_group(
        "verification (thresholds per precision, read from each artifact; dynamic uses int8's)")
    defaults = Thresholds()
    for precision in ("float32", "float16", "int8"):
        limit = defaults.of(precision)
        group.add_argument(f"--{precision}-agreement", type=float, metavar="FRACTION",
                           default=limit.top1_agreement,
                           help=f"least top-1 agreement with the original (default "
                                f"{limit.top1_agreement:g})")
        group.add_argument(f"--{precision}-max-diff", type=float, metavar="PROBABILITY",
                           default=limit.max_abs_diff,
                           help="largest absolute probability difference (default "
                                + ("none" if limit.max_abs_diff is None
                                   else f"{limit.max_abs_diff:g}") + ")")
    group.add_argument("--allow-skip", action="store_true",
                       help="show an artifact no runtime on this machine can run as skipped "
                            "instead of failing (a skipped check is never a pass)")


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

    convert = commands.add_parser("convert", help="convert a retrained model for apps")
    source = convert.add_argument_group("model to convert (one of)")
    source.add_argument("--model", type=Path, help="a retrain or build output directory")
    source.add_argument("--graph", type=Path, help="a TF-for-Poets frozen graph (.pb)")
    _add_graph(convert)
    convert.add_argument("--image-dir", type=Path,
                         help="training images for int8 calibration (default: the recorded split)")
    convert.add_argument("--output-dir", type=Path,
                         help="where artifacts go (default: beside the model)")
    _add_targets(convert)

    build = commands.add_parser("build", help="retrain, convert and verify, end to end")
    _add_data(build)
    _add_backbone(build)
    _add_training(build)
    build.add_argument("--output-dir", type=Path, default=Path("toolchain-build"),
                       help="where the model, artifacts and reports go (default toolchain-build)")
    _add_targets(build)
    _add_verification(build)

    verify = commands.add_parser("verify", help="check converted models against the original")
    verify.add_argument("--model", type=Path, required=True,
                        help="the retrained model (a retrain or build output directory)")
    verify.add_argument("--artifact", type=Path, nargs="+", action="extend", required=True,
                        dest="artifacts", metavar="PATH",
                        help=".tflite, .mlmodel or .mlpackage files to check (repeatable)")
    verify.add_argument("--image-dir", type=Path, required=True,
                        help="the image folder the model was trained on: its held-out "
                             "(testing) split is used")
    verify.add_argument("--report-dir", type=Path,
                        help="where report.json, report.md, junit.xml and confusion/ go "
                             "(default: the first artifact's folder)")
    _add_verification(verify)

    label = commands.add_parser("label", help="classify one image")
    label.add_argument("--model", type=Path, required=True,
                       help="a retrain output folder, .tflite, .mlmodel, .mlpackage or .pb")
    label.add_argument("--image", type=Path, required=True)
    label.add_argument("--top-k", type=int, default=5)
    _add_graph(label)

    install = commands.add_parser("install", help="copy a built model into a sample app")
    install.add_argument("--app", choices=("ios", "android"), required=True,
                         help="ios: sample_apps/ios (Core ML); android: sample_apps/android "
                              "(TFLite)")
    install.add_argument("--from", dest="source", type=Path, required=True,
                         help="the --output-dir of `toolchain build`, or one model file")
    install.add_argument("--apps-dir", type=Path,
                         help="the sample_apps folder (default: the toolchain's own)")

    bench = commands.add_parser("bench", help="measure the whole chain and print one table")
    bench.add_argument("--architecture", action="append", dest="architectures",
                       help="extraction benchmark, repeatable (default mobilenet_0.50_224, "
                            "mobilenet_v2_1.0_224, inception_v3)")
    bench.add_argument("--chain-architecture", default="mobilenet_0.50_224",
                       help="the backbone retrained, converted and timed (default %(default)s)")
    bench.add_argument("--weights", default="none",
                       help="none (default: offline, same FLOPs), imagenet or a .h5 file")
    bench.add_argument("--image-dir", type=Path, help="images to use (default: sample data)")
    bench.add_argument("--images", type=int, default=240,
                       help="images to time extraction on (default 240)")
    bench.add_argument("--repeats", type=int, default=3, help="runs per figure; median shown")
    bench.add_argument("--steps", type=int, default=4000,
                       help="training steps timed (default 4000, retrain.py's)")
    bench.add_argument("--latency-runs", type=int, default=50,
                       help="one-image calls per latency figure (default 50)")
    bench.add_argument("--only", choices=("extraction", "chain"), help="run one part")
    bench.add_argument("--json", type=Path, help="also write the figures here")
    return parser


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
    # coremltools warns on import that its macOS-only runtime is missing and that TF 2.13 is
    # newer than it was tested with: true, known, and not the user's to act on.
    logging.getLogger("coremltools").setLevel(logging.ERROR)


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
    except OSError as error:
        # A safety net: stages map the file errors they expect; any other one (a disk that
        # fills up mid-run, a folder made read-only meanwhile) still gets one line naming the path.
        if args.debug:
            raise
        where = f" {error.filename}" if error.filename else ""
        print(f"toolchain: error: cannot access{where}: {error.strerror or error}",
              file=sys.stderr)
        return EXIT_ERROR
