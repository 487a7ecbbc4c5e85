"""Every command-line flag reaches its option, and every option's effect shows in what is written.

The first half walks every subparser: each flag is set to a value other than its default and
must arrive, unchanged, at its leaf of the command's options object; a flag that maps to no leaf,
or a leaf with no flag, fails. The second half runs ``toolchain build`` with non-default values
and reads each one back from model.json, split.json, the artifacts' own metadata and report.json,
so a value that reaches the options but not its stage fails too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.helpers import TINY_ARCH
from toolchain import cli, commands, options

#: Values that must be valid names (a generated string would be refused, rightly).
_NAMED = {"architecture": "mobilenet_v2_0.35_96", "chain_architecture": "mobilenet_0.25_128",
          "mlmodel_architecture": "mobilenet_v3_small_96",
          "targets": ["tflite", "coreml"], "architectures":
          ["mobilenet_0.25_128", "mobilenet_v3_small_96"], "shard": "1/4",
          "scale_sizes": [100, 300]}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _other_value(leaf: options.Leaf):
    """A valid value for ``leaf`` that is not its default, as the command line spells it."""
    if leaf.name == "weights":  # the backbone's default is imagenet, the benchmark's none
        return "imagenet" if leaf.default == "none" else "none"
    if leaf.name in _NAMED:
        return _NAMED[leaf.name]
    kind = options._inner(leaf.type)
    default = None if leaf.required else leaf.default
    if leaf.choices:
        return next(choice for choice in leaf.choices if choice != default)
    if kind is bool:
        return True
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return 0.5 if default is None else default / 2 if default else 12.5
    if kind is Path:
        values = [Path(f"/nowhere/{leaf.name}/{i}") for i in (1, 2)]
        return values if leaf.append or leaf.nargs else values[0]
    return f"value of {leaf.name}"


def _argv(leaf: options.Leaf, value) -> list[str]:
    if leaf.positional:
        return [str(value)]
    flag = "--" + leaf.flag.replace("_", "-")
    if value is True:
        return [flag]
    if leaf.append:
        return [token for item in value for token in (flag, str(item))]
    if leaf.nargs:
        return [flag, *map(str, value)]
    return [flag, str(value)]


_GRAPH_FLAGS = {"labels", "input_name", "output_name", "input_mean", "input_std"}
#: Flags that exclude each other: each run leaves one side out (convert: --model or --graph;
#: verify: --images, with a frozen graph's flags, or --image-dir, with a retrain folder).
_RUNS = {"convert": [{"graph", *_GRAPH_FLAGS}, {"model"}],
         "verify": [{"image_dir"}, {"images", *_GRAPH_FLAGS}],
         "sample-data": [{"cifar10"}, {"seed"}],
         "bottlenecks": [{"status", "shards"}, {"shard"}],
         "bench": [{"scale", "scale_sizes"}, {"only"}]}
#: Values a run needs, by (command, a flag it leaves out): the graph flags need a .pb original.
_RUN_VALUES = {("verify", "image_dir"): {"model": "/nowhere/old/retrained_graph.pb"}}


@pytest.mark.parametrize("command", sorted(commands.COMMANDS))
def test_every_flag_reaches_its_option(command):
    options_class = commands.COMMANDS[command][0]
    leaves = {leaf.name: leaf for leaf in options.leaves(options_class)}
    flags = {leaf.name for leaf in leaves.values() if leaf.cli}
    dests = {action.dest for action in _subparsers()[command]._actions
             if action.dest not in ("help", *cli.CLI_ONLY)}
    assert dests == flags, "a flag without an option, or an option without a flag"
    assert {leaf.name for leaf in leaves.values() if not leaf.cli} <= {
        "progress", "batch_size", "isolate"}, "options kept off the command line, on purpose"
    reached = set()
    for left_out in _RUNS.get(command, [set()]):
        given = {name: _other_value(leaves[name]) for name in sorted(flags - left_out)}
        for out in left_out:
            given.update(_RUN_VALUES.get((command, out), {}))
        argv = [command] + [token for name, value in given.items()
                            for token in _argv(leaves[name], value)]
        built = cli.options_for(argv)
        assert isinstance(built, options_class)
        flat = options.flatten(built)
        for name, value in given.items():
            want = tuple(value) if isinstance(value, list) else value
            if options._inner(leaves[name].type) is Path:
                want = tuple(map(Path, want)) if isinstance(want, tuple) else Path(want)
            assert flat[name] == want, f"--{name.replace('_', '-')} did not reach its option"
            assert flat[name] != leaves[name].default, name
            reached.add(name)
    assert reached == flags


@pytest.mark.parametrize(("flags", "tflite", "coreml"), [
    ([], 0.98, 0.98),
    (["--int8-agreement", "0.99"], 0.99, 0.99),
    (["--tflite-variant", "float16", "--float16-agreement", "0.997"], 0.997, 0.98),
    (["--int8-agreement", "0.99", "--tflite-repair-agreement", "0.95"], 0.95, 0.99),
], ids=["defaults", "int8 threshold", "float16 threshold", "repair agreement given"])
def test_a_builds_repair_aims_at_the_threshold_its_verifier_judges_by(flags, tflite, coreml):
    """The repair of ``build`` aims where the verdict is: a stricter ``--int8-agreement`` is
    what int8's repair must reach too, unless the repair's own agreement is given."""
    argv = ["build", "--image-dir", "photos", "--target", "tflite", "--target", "coreml",
            "--coreml-precision", "int8", *flags]
    jobs = dict((target.name, options) for target, options in cli.options_for(argv).jobs())
    assert jobs["tflite"].target_agreement == tflite
    assert jobs["coreml"].repair_agreement == coreml


def test_convert_alone_aims_at_the_default_thresholds():
    argv = ["convert", "--model", "out", "--target", "tflite"]
    ((_, tflite),) = cli.options_for(argv).jobs()
    assert tflite.repair_agreement is None and tflite.target_agreement == 0.98


@pytest.mark.parametrize("command", sorted(commands.COMMANDS))
def test_flags_left_out_take_the_options_defaults(command):
    """Only the required flags: everything else is exactly the dataclass defaults."""
    options_class = commands.COMMANDS[command][0]
    required = [leaf for leaf in options.leaves(options_class) if leaf.required]
    argv = [command] + [token for leaf in required for token in _argv(leaf, _other_value(leaf))]
    chosen = {"convert": "model", "verify": "images"}  # one of two is needed
    if command in chosen:
        argv += [f"--{chosen[command]}", "m"]
    flat = options.flatten(cli.options_for(argv))
    for leaf in options.leaves(options_class):
        if not leaf.required and leaf.name != chosen.get(command):
            assert flat[leaf.name] == leaf.default, leaf.name


def test_quiet_turns_progress_bars_off():
    base = ["bottlenecks", "--image-dir", "photos"]
    assert cli.options_for(base).progress is True
    assert cli.options_for(["--quiet", *base]).progress is False
    assert cli.options_for([*base, "--quiet"]).progress is False


def test_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default
    for command, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        for leaf in options.leaves(commands.COMMANDS[command][0]):
            if not leaf.cli or leaf.required or leaf.default in (False, None, ()):
                continue
            shown = (f"{leaf.default:g}" if isinstance(leaf.default, float)
                     else str(leaf.default))
            assert f"(default: {shown})" in text, f"{command} --{leaf.flag}"


def test_build_takes_every_flag_of_retrain_and_convert():
    flags = {name: {leaf.name for leaf in options.leaves(commands.COMMANDS[name][0]) if leaf.cli}
             for name in ("retrain", "convert", "build")}
    # convert's source selection has no meaning in build: the model is the one it trains.
    source_only = {"model", "graph", "labels", "input_name", "output_name", "input_mean",
                   "input_std"}
    assert flags["retrain"] <= flags["build"]
    assert flags["convert"] - source_only <= flags["build"]


@pytest.mark.parametrize("argv, message", [
    (["convert", "--model", "m", "--target", "tflite", "--coreml-format", "mlprogram"],
     "--coreml-format given, but not --target coreml"),
    (["build", "--image-dir", "d", "--target", "coreml", "--tflite-variant", "float16"],
     "--tflite-variant given, but not --target tflite"),
    (["convert", "--model", "m", "--target", "tflite", "--input-std", "128"],
     "apply to --graph only"),
    (["convert", "--model", "m", "--graph", "g.pb", "--target", "tflite"],
     "exactly one of --model and --graph"),
    (["build", "--image-dir", "d", "--target", "onnx"], "unknown target 'onnx'"),
    (["build", "--image-dir", "d", "--target", "tflite", "--float16-agreement", "1.5"],
     "not between 0 and 1"),
    (["label", "--model", "m", "--image", "i", "--top-k", "0"], "--top-k must be at least 1"),
    (["verify", "--model", "m", "--artifact", "a.tflite"],
     "pass exactly one of --images and --image-dir"),
    (["verify", "--model", "m", "--artifact", "a.tflite", "--images", "p", "--image-dir", "d"],
     "pass exactly one of --images and --image-dir"),
    (["verify", "--model", "g.pb", "--artifact", "a.tflite", "--image-dir", "d"],
     "--image-dir reads the recorded split of a retrain or build folder, and g.pb has none"),
    (["verify", "--model", "m.keras", "--artifact", "a.tflite", "--images", "p",
      "--output-name", "x"], "--output-name does not apply to m.keras"),
    (["verify", "--model", "out", "--artifact", "a.tflite", "--image-dir", "d",
      "--input-std", "128"], "--input-std does not apply to out"),
    (["verify", "--model", "m", "--artifact", "a.tflite", "--images", "p", "--min-images",
      "-1"], "--min-images must be 0 (off) or more"),
])
def test_an_option_that_would_be_ignored_or_is_invalid_is_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len([ln for ln in err.splitlines() if "error:" in ln]) == 1


# -- each option's effect in what is written -------------------------------------------------

_TRAINING = {"how_many_training_steps": 37, "learning_rate": 0.02, "train_batch_size": 40,
             "eval_step_interval": 7, "validation_batch_size": 9,
             "print_misclassified_test_images": True, "seed": 5}
_DISTORTIONS = {"flip_left_right": True, "random_crop": 10.0, "random_scale": 15.0,
                "random_brightness": 20.0, "variants": 2}
_METADATA = {"name": "Seam Model", "description": "Reads every flag back.",
             "author": "Seam Author", "license": "Seam License", "version": "9.8.7"}
_THRESHOLDS = {"float32": {"top1_agreement": 0.5, "max_abs_diff": 0.75},
               "float16": {"top1_agreement": 0.25, "max_abs_diff": 0.9},
               "int8": {"top1_agreement": 0.125, "max_abs_diff": None}}


@pytest.fixture(scope="module")
def seam_build(tmp_path_factory, sample_dir, session_cache):
    """One build with every training, split, distortion, output, metadata, target and
    threshold flag set to something other than its default."""
    import io
    from contextlib import redirect_stdout

    root = tmp_path_factory.mktemp("seams")
    argv = ["build", "--image-dir", str(sample_dir), "--architecture", TINY_ARCH,
            "--weights", "none", "--bottleneck-dir", str(session_cache),
            "--output-dir", str(root / "out"), "--quiet",
            "--validation-percentage", "15", "--testing-percentage", "25",
            "--summaries-dir", str(root / "tb"), "--output-graph", str(root / "g" / "graph.pb"),
            "--output-labels", str(root / "g" / "labels.txt"),
            "--target", "coreml", "--target", "tflite", "--coreml-format", "mlprogram",
            "--coreml-precision", "float16", "--tflite-variant", "int8",
            "--tflite-calibration-images", "3", "--tflite-tuning-images", "7",
            "--tflite-repair-agreement", "0.99", "--tflite-max-size-ratio", "0.45",
            "--tflite-explain", "--tflite-no-repair", "--allow-skip"]
    for name, value in _TRAINING.items():
        argv += _flag(name, value)
    for name, value in _DISTORTIONS.items():
        argv += _flag("distorted_variants" if name == "variants" else name, value)
    for name, value in _METADATA.items():
        argv += _flag("model_version" if name == "version" else name, value)
    for precision, limits in _THRESHOLDS.items():
        argv += _flag(f"{precision}_agreement", limits["top1_agreement"])
        if limits["max_abs_diff"] is not None:
            argv += _flag(f"{precision}_max_diff", limits["max_abs_diff"])
    import targets

    calibrated, real = [], targets.Source.calibration_batches

    def counted(source, count):
        calibrated.append(count)
        return real(source, count)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        patch.setattr(targets.Source, "calibration_batches", counted)
        code = cli.main(argv)
    return root, code, printed.getvalue(), calibrated


def _flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    return [flag] if value is True else [flag, str(value)]


@pytest.mark.slow
def test_training_split_and_distortion_flags_reach_the_training(seam_build):
    import tensorflow as tf

    root, code, printed, _ = seam_build
    assert code == 0, printed
    split = json.loads((root / "out" / "model" / "split.json").read_text())
    assert split["training_options"] == _TRAINING
    assert split["distortions"] == _DISTORTIONS
    assert (split["validation_percentage"], split["testing_percentage"]) == (15.0, 25.0)
    manifest = json.loads((root / "out" / "model" / "model.json").read_text())
    assert manifest["training_steps"] == 37
    # evaluated every 7 of 37 steps, and at the last: steps 7, 14, 21, 28, 35 and 37
    (events,) = (root / "tb" / "train").glob("events.out.tfevents.*")
    steps = sorted(event.step for event in tf.compat.v1.train.summary_iterator(str(events))
                   for value in event.summary.value if value.tag == "accuracy")
    assert steps == [7, 14, 21, 28, 35, 37]
    assert list((root / "tb" / "validation").glob("events.out.tfevents.*"))
    assert not (root / "out" / "model" / "summaries").exists()
    misclassified = [line for line in printed.splitlines() if line.startswith("misclassified:")]
    assert len(misclassified) == round((1 - manifest["test_accuracy"]) * manifest["test_images"])


@pytest.mark.slow
def test_output_flags_write_their_files(seam_build):
    root, _, _, _ = seam_build
    labels = (root / "out" / "labels.txt").read_text()
    assert (root / "g" / "labels.txt").read_text() == labels
    assert (root / "g" / "graph.pb").stat().st_size > 1000


@pytest.mark.slow
def test_target_and_metadata_flags_are_in_the_artifacts(seam_build):
    import targets

    root, _, _, calibrated = seam_build
    coreml = targets.get("coreml").inspect(root / "out" / "model_float16.mlpackage")
    assert (coreml.format, coreml.precision) == ("mlprogram", "float16")
    assert coreml.metadata == {key: _METADATA[key]
                               for key in ("description", "author", "license", "version")}
    tflite = targets.get("tflite").inspect(root / "out" / "model_int8.tflite")
    assert tflite.precision == "int8" and tflite.metadata == _METADATA
    # --tflite-calibration-images reached the int8 calibration, and its repair stage's own.
    assert calibrated and set(calibrated) == {3}
    record = targets.get("tflite").diagnosis(root / "out" / "model_int8.tflite")
    assert record["tuning_images"] == 7 and record["target_top1_agreement"] == 0.99
    assert record["budget_bytes"] == int(0.45 * record["float32_bytes"])
    assert record["layers"], "--tflite-explain diagnoses every layer"
    # --tflite-no-repair: int8 missed 0.99 here, and still no layer was tried in float.
    assert record["needed"] and record["steps"] == [] and not record["repaired"]
    assert not (root / "out" / "model_int8_mixed.tflite").exists()


@pytest.mark.slow
def test_verification_flags_are_in_the_report(seam_build):
    root, _, _, _ = seam_build
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["allow_skip"] is True
    for check in report["artifacts"]:
        assert check["threshold"] == _THRESHOLDS[check["precision"]], check["path"]
