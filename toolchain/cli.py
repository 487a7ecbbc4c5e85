"""The ``toolchain`` command line: parsers made from the commands' options, printing, errors.

Each command is an options class and a run function (:mod:`toolchain.commands`); this module
only turns a command line into that options object (every flag is generated from the options'
fields, so none can go nowhere), calls the run function, and prints its result. The parsed
namespace never leaves this module.

Dashes are canonical; retrain.py's underscore spellings (``--image_dir``,
``--how_many_training_steps``, ``--output_graph``, ...) are accepted as aliases by rewriting
them before parsing, so ``--help`` stays readable. Every :class:`ToolchainError` becomes one
line (and a hint) with a non-zero exit; ``--debug`` shows the traceback, causes included.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from toolchain import __version__
from toolchain.errors import EXIT_ERROR, EXIT_INTERRUPTED, ToolchainError
from toolchain.untrusted import shown

log = logging.getLogger("toolchain")

#: Flags the command line handles itself; every other dest goes to the command's options.
CLI_ONLY = ("command", "debug", "quiet")
HELP = {"sample-data": "write the built-in demo dataset",
        "bottlenecks": "fill the bottleneck cache",
        "retrain": "retrain the last layer on cached bottlenecks",
        "convert": "convert a retrained model (or a frozen graph) for apps",
        "build": "retrain, convert and verify, end to end",
        "verify": "check converted models against the original",
        "label": "classify one image",
        "install": "copy a built model into a sample app",
        "bench": "measure the whole chain and print one table"}


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


def build_parser() -> argparse.ArgumentParser:
    from toolchain.commands import COMMANDS
    from toolchain.options import add_arguments

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
    for name, (options_class, _) in COMMANDS.items():
        sub = commands.add_parser(name, parents=[common], help=HELP[name],
                                  description=HELP[name][0].upper() + HELP[name][1:] + ".")
        add_arguments(sub, options_class)
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The namespace (for the CLI's own flags) and the command's flat option values."""
    from toolchain.commands import COMMANDS
    from toolchain.options import command_values

    args = build_parser().parse_args(_normalize(list(argv)))
    options_class = COMMANDS[args.command][0]
    values = command_values(args, options_class, CLI_ONLY)
    if "progress" in options_class.__dataclass_fields__:
        values["progress"] = not args.quiet
    return args, values


def options_for(argv: list[str]):
    """The command's validated options object for a command line (what ``main`` runs)."""
    from toolchain.commands import COMMANDS
    from toolchain.options import build

    args, values = parse(argv)
    return build(COMMANDS[args.command][0], values, where=f"toolchain {args.command}")


# -- printing ----------------------------------------------------------------------------------


def _size(path: Path) -> str:
    from targets import artifact_bytes

    return f"{artifact_bytes(path) / 1e6:.2f} MB"


def _conversions(conversions) -> None:
    """One line per artifact; each failure in one line naming the target."""
    for item in conversions:
        if item.ok:
            _say(f"{item.target}: wrote {item.path} ({_size(item.path)}, {item.seconds:.1f} s)")
        else:
            _say(f"toolchain: error: target {item.target} failed: {item.error}", file=sys.stderr)


def _verified(report, files) -> None:
    from toolchain.statistics import interval_text

    n = len(report.images)
    if report.original_accuracy is None:
        accuracy = f"unlabelled images, so no accuracy: {report.unlabelled_because}"
    else:
        accuracy = (f"original accuracy {report.original_accuracy:.1%}, "
                    f"{interval_text(report.original_accuracy_interval, n)}")
    _say(f"verified on {n} held-out images ({accuracy}):")
    for check in report.checks:
        figures = ("" if check.top1_agreement is None else
                   f" agreement {check.top1_agreement:.4f} "
                   f"({interval_text(check.top1_agreement_interval, check.images)}), "
                   f"max abs diff {check.max_abs_diff:.2e},")
        reason = f": {check.reason}" if check.reason else ""
        kind = check.precision + (f", {check.compute} compute" if check.compute else "")
        _say(f"  {check.status.upper():8} {check.name} ({kind}){figures.rstrip(',')}{reason}")
    for warning in report.warnings:
        _say(f"  warning: {warning}")
    for failure in report.failures:
        _say(f"  FAILED   {failure}")
    verdict = report.verdict if report.verdict != "failed" else "FAILED"
    _say(f"verification {verdict}; reports: {files['markdown']}, {files['json']}, "
          f"{files['junit']}")
    if report.hint:
        _say(f"hint: {report.hint}")


def _retrained(result) -> None:
    info = result.info
    accuracy = "n/a (empty test set)" if info.test_accuracy is None else f"{info.test_accuracy:.1%}"
    _say(f"retrained {info.architecture} on {len(info.labels)} classes in {result.seconds:.1f} s "
          f"(bottlenecks: {result.bottlenecks_cached} cached, {result.bottlenecks_computed} "
          f"computed)")
    _say(f"final test accuracy = {accuracy} (N={info.test_images}); "
          f"train accuracy {result.train_accuracy:.1%}")
    if result.skipped:
        _say(f"skipped {result.skipped} file(s), each named with its reason in "
              f"{result.output_dir / 'split.json'}")
    _say(f"model written to {result.output_dir}")


def _cache_status(result) -> int:
    status = result.status
    _say(f"bottlenecks for {result.architecture}: {status.cached} of {status.vectors} cached, "
          f"{status.missing} missing, {result.skipped} skipped; cache {result.cache_dir}")
    shards = len(status.missing_by_shard)
    if shards > 1:
        incomplete = status.incomplete_shards()
        _say(f"shards of {shards}: " + (", ".join(
            f"{index}/{shards} missing {status.missing_by_shard[index]}"
            for index in incomplete) if incomplete else "all complete"))
    for path in status.examples:
        _say(f"  missing: {path}")
    return result.exit_code


def show(command: str, result, options) -> int:
    """Print a command's result as the CLI does; its exit code."""
    if command == "sample-data":
        verb = "wrote" if result.created else "already up to date:"
        _say(f"{verb} {result.images} images in {len(result.classes)} classes "
              f"({', '.join(result.classes)}) to {result.out_dir}")
    elif command == "bottlenecks":
        if result.status is not None:
            return _cache_status(result)
        rate = f" at {result.images_per_second:.1f} img/s" if result.computed else ""
        shard = (f" (shard {result.shard}; {result.elsewhere} left to the other shards)"
                 if result.shard else "")
        _say(f"bottlenecks for {result.architecture}{shard}: {result.cached} cached, "
              f"{result.computed} computed{rate}, {result.skipped} skipped; "
              f"cache {result.cache_dir}")
    elif command == "retrain":
        _retrained(result)
    elif command == "convert":
        _conversions(result.conversions)
        return result.exit_code
    elif command == "build":
        _retrained(result.retrained)
        _conversions(result.conversions)
        if result.report is not None:
            _verified(result.report, result.files)
        return result.exit_code
    elif command == "verify":
        _verified(result.report, result.files)
        return result.exit_code
    elif command == "label":
        for prediction in result:
            _say(f"{prediction.label} (score = {prediction.score:.5f})")
    elif command == "install":
        listed = ", ".join(result.labels[:6]) + (f", ... ({len(result.labels)} in all)"
                                                 if len(result.labels) > 6 else "")
        if result.picked:
            _say(result.picked)
        _say(f"installed {result.source} as {result.destination}")
        verdict = result.verdict
        if verdict is not None and verdict.passed:
            _say(f"verified: passed on {verdict.images} held-out images ({verdict.report}); "
                 f"record: {result.record}")
        elif verdict is not None:
            _say(f"NOT VERIFIED ({verdict.status}): {verdict.reason}; record: {result.record}")
        _say(f"labels read from the model: {listed}; input {result.input_size}x"
             f"{result.input_size} px")
        tool = "Xcode and run" if options.app == "ios" else \
            "Android Studio and run (or ./gradlew installDebug)"
        _say(f"next: open {result.project} in {tool}")
    return 0


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"toolchain: {record.levelname.lower()}: {shown(record.getMessage())}"


def _say(text: str = "", file=None) -> None:
    """``print`` of one line, every control character in it escaped (``untrusted.shown``):
    labels and file names come from strangers' files, and one holding an escape sequence or a
    line break must neither repaint the terminal nor pass for a line of its own."""
    print(shown(str(text)), file=sys.stdout if file is None else file)


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


def _run(args: argparse.Namespace, values: dict) -> int:
    from toolchain.commands import COMMANDS
    from toolchain.options import build

    options_class, run = COMMANDS[args.command]
    options = build(options_class, values, where=f"toolchain {args.command}")  # validated now
    return show(args.command, run(options), options)


class _CtrlC:
    """Ctrl-C raises KeyboardInterrupt, as Python's own handler does, and is remembered.

    TensorFlow's C code turns a Python exception raised inside a call it makes back into Python
    into an error of its own: a Ctrl-C while a summary writer was being created surfaced as
    ``TypeError: Expected `context` argument in EagerTensor constructor to have a `_handle`
    attribute``. Once a Ctrl-C has been seen, whatever escapes the command is that interruption.
    Installed only over Python's default handler, in the main thread (not over an embedding
    program's own), and restored on the way out.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous = None

    def __enter__(self) -> _CtrlC:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt


def _interrupted() -> int:
    _say("toolchain: interrupted; everything written so far is complete and kept",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args, values = parse(sys.argv[1:] if argv is None else argv)
    _configure_logging(args.quiet)
    with _CtrlC() as ctrl_c:
        try:
            return _run(args, values)
        except KeyboardInterrupt:
            if args.debug:
                raise
            return _interrupted()
        except Exception as error:
            if args.debug:
                raise
            if ctrl_c.seen:  # the interruption, turned into another error on its way out
                return _interrupted()
            return _failed(error)


def _failed(error: Exception) -> int:
    """One line (and a hint) for the errors the toolchain knows; any other one is a bug and
    keeps its traceback."""
    if isinstance(error, ToolchainError):
        _say(f"toolchain: error: {error.message}", file=sys.stderr)
        if error.hint:
            _say(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    if isinstance(error, OSError):
        # A safety net: stages map the file errors they expect; any other one (a disk that
        # fills up mid-run, a folder made read-only meanwhile) still gets one line naming the path.
        where = f" {error.filename}" if error.filename else ""
        _say(f"toolchain: error: cannot access{where}: {error.strerror or error}",
              file=sys.stderr)
        return EXIT_ERROR
    raise error
