"""The verifier's outputs: ``report.json``, ``report.md``, ``junit.xml`` and confusion PNGs.

- ``report.json`` is for machines (its schema is in docs/ARCHITECTURE.md: ``passed``,
  ``held_out_images`` and one entry per artifact and runtime with ``target``, ``path``,
  ``runtime``, ``top1_agreement``, ``max_abs_diff``, ``threshold``, ``passed``, plus everything
  else the verifier measured);
- ``report.md`` is the table a person reads in a pull request;
- ``junit.xml`` has one test case per artifact and runtime, so CI systems list them;
- ``confusion/*.png``: true label (rows) against predicted label (columns), for the original
  model and each artifact in each runtime, drawn with Pillow (no plotting dependency). On
  unlabelled images the rows are the original's predictions and the original has no matrix.

Every agreement figure is shown with its 95% Wilson interval and the number of images, and a
set too small for a threshold to mean anything is warned about in each file. The verdict is
``passed``, ``failed`` or ``inconclusive`` (a check met its threshold on too few images to show
it): report.json's ``verdict`` and each row's ``status``, report.md's header and result column,
and in junit.xml a ``skipped`` element of ``type="inconclusive"``.

Every file is written atomically; a failed run's report is written too (that is when it matters).
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from targets._repair import chosen, origin_text
from toolchain import atomic
from toolchain.statistics import interval_text
from toolchain.untrusted import shown
from toolchain.verification import FAILED, INCONCLUSIVE, MEASURED, PASSED, SKIPPED, Check, Report

JSON, MARKDOWN, JUNIT, CONFUSION_DIR = "report.json", "report.md", "junit.xml", "confusion"
#: Disagreeing images listed per artifact in report.md (report.json lists them all).
MARKDOWN_DISAGREEMENTS = 10
#: The most harmful int8 layers listed per artifact in report.md (report.json lists them all).
MARKDOWN_LAYERS = 10


def write(report: Report, folder: Path) -> dict[str, Path]:
    """Write every output into ``folder``; returns what was written, by kind."""
    folder = Path(folder)
    pngs = {}
    original = report.confusion()
    if original is not None:
        pngs["original"] = folder / CONFUSION_DIR / "original.png"
    for number, check in enumerate(report.checks, 1):
        if check.confusion is not None:
            pngs[check.name] = folder / CONFUSION_DIR / f"{number:02d}-{_slug(check.name)}.png"
    if original is not None:
        atomic.write_bytes(pngs["original"], confusion_png(original, report.labels,
                                                            "original (retrained model)"))
    for check in report.checks:
        if check.confusion is not None:
            atomic.write_bytes(pngs[check.name], confusion_png(check.confusion, report.labels,
                                                               check.name, report.rows))
    record = report.record()
    record["confusion_png"] = {name: str(path.relative_to(folder)) for name, path in pngs.items()}
    atomic.write_json(folder / JSON, record)
    atomic.write_text(folder / MARKDOWN, markdown(report))
    atomic.write_bytes(folder / JUNIT, junit(report))
    return {"json": folder / JSON, "markdown": folder / MARKDOWN, "junit": folder / JUNIT,
            "confusion": folder / CONFUSION_DIR}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _small(value: float | None) -> str:
    """Probability differences span 1e-7 (float32) to 1 (a wrong label): scientific notation."""
    return "—" if value is None else f"{value:.2e}"


def _agreement(check: Check) -> str:
    """``0.9600 (95% CI 0.80–0.99, n=25)``, or — without figures."""
    if check.top1_agreement is None:
        return "—"
    return (f"{check.top1_agreement:.4f} "
            f"({interval_text(check.top1_agreement_interval, check.images)})")


def _accuracy(value: float | None, report: Report) -> str:
    return "n/a" if not report.labelled else _number(value)


def _limit(check: Check) -> str:
    text = f"≥ {check.threshold.top1_agreement:g}"
    if check.threshold.max_abs_diff is not None:
        text += f", diff ≤ {check.threshold.max_abs_diff:g}"
    return text


def _cell(text: str) -> str:
    """A table cell: control characters escaped (labels and file names are a stranger's)."""
    return shown(str(text)).replace("|", "\\|")


def markdown(report: Report) -> str:
    """A table per artifact and runtime, then the disagreeing images of each failed check."""
    verdict = {PASSED: "✅ passed", INCONCLUSIVE: "❔ inconclusive"}.get(report.verdict,
                                                                         "❌ FAILED")
    n = len(report.images)
    where = ("its recorded testing split" if report.held_out_from == "split"
             else "every image of the folder")
    if report.labelled:
        accuracy = (f"original accuracy {_number(report.original_accuracy)} "
                    f"({interval_text(report.original_accuracy_interval, n)})")
    else:
        accuracy = (f"unlabelled ({report.unlabelled_because}): agreement only, accuracy n/a, "
                    "confusion rows are the original's predictions")
    lines = [f"# Verification: {verdict}", "",
             f"Model `{shown(report.architecture)}` ({len(report.labels)} classes), "
             f"**{n} held-out images** from `{shown(str(report.image_dir))}` ({where}); "
             f"{accuracy}.", ""]
    model = report.original_model
    if model:
        pre = model["preprocessing"]
        lines += [f"Original: {model['kind']} `{shown(str(model['path']))}`, input "
                  f"{model['input_size']} "
                  f"px, mean {_values(pre['mean'])}, std {_values(pre['std'])} (from "
                  f"{model['preprocessing_source']}).", ""]
    lines += [f"❌ {shown(failure)}." for failure in report.failures]
    lines += [f"⚠️ {shown(warning)}." for warning in report.warnings]
    if report.verdict == INCONCLUSIVE:
        lines.append(f"❔ {report.hint}.")
    if report.failures or report.warnings or report.verdict == INCONCLUSIVE:
        lines.append("")
    if report.unreadable:
        lines += [f"{len(report.unreadable)} held-out image(s) could not be read and were left "
                  "out: " + ", ".join(f"`{shown(str(p))}`" for p, _ in report.unreadable), ""]
    lines += ["| artifact | runtime | precision | top-1 agreement | threshold | max abs diff "
              "| mean abs diff | accuracy | result |",
              "|---|---|---|---|---|---|---|---|---|"]
    for check in report.checks:
        result = {PASSED: "✅ passed", SKIPPED: "⚠️ skipped", FAILED: "❌ failed",
                  MEASURED: "ℹ️ measured", INCONCLUSIVE: "❔ inconclusive"}[check.status]
        if check.reason:
            result += f": {check.reason}"
        lines.append("| " + " | ".join(_cell(cell) for cell in (
            f"`{check.shown or check.path.name}`", check.runtime, check.precision,
            _agreement(check), _limit(check), _small(check.max_abs_diff),
            _small(check.mean_abs_diff), _accuracy(check.accuracy, report), result)) + " |")
    lines += _quantization(report)
    for check in report.checks:
        if not check.disagreements:
            continue
        listed = check.disagreements[:MARKDOWN_DISAGREEMENTS]
        lines += ["", f"## {shown(check.name)}: {len(check.disagreements)} disagreement(s)", "",
                  "| image | true label | original | artifact |", "|---|---|---|---|"]
        lines += [f"| `{_cell(d['image'])}` | {_cell(d['label'] or '—')} | "
                  f"{_cell(d['original'])} "
                  f"({d['original_score']:.3f}) | {_cell(d['artifact'])} "
                  f"({d['artifact_score']:.3f}) |" for d in listed]
        if len(check.disagreements) > len(listed):
            lines.append(f"\n…and {len(check.disagreements) - len(listed)} more in report.json.")
    return "\n".join(lines) + "\n"


def _quantization(report: Report) -> list[str]:
    """Per quantized artifact: how it did on the tuning set, whether and how it was repaired, and
    the layers that harm it most (report.json has them all)."""
    lines = []
    for artifact, found in report.quantization.items():
        step, tuning = found["int8"], found["tuning_images"]
        origin = origin_text(found["tuning_from"])
        # A frozen graph never saw the folder: its testing split may tune (targets/_tuning.py).
        unseen = "" if "validation and testing" in found["tuning_from"] else \
            "; never a testing image"
        shows = f" {found['tuning_shows']}." if found.get("tuning_shows") else ""
        lines += ["", f"## Quantization: `{_cell(artifact)}`", "",
                  f"{found.get('precision', 'int8')} agreed with the original on "
                  f"{step['top1_agreement']:.4f} of {tuning} "
                  f"tuning images ({origin}{unseen}; target "
                  f"{found['target_top1_agreement']:g}), {step['bytes'] / 1e6:.2f} MB.{shows}"]
        kept = chosen(found["steps"]) if found["repaired"] else None
        if kept:
            run = found.get("float_run", 0)
            lines.append(f"Repaired: {kept['float_layers']} layer(s) kept in float"
                         f"{f' (the first {run} from the input)' if run else ''} → "
                         f"`{found['repaired_artifact']}`, {kept['top1_agreement']:.4f} on the "
                         f"tuning images, {kept['bytes'] / 1e6:.2f} MB "
                         f"({kept['bytes'] / found['float32_bytes']:.2f} of float32).")
        elif found["needed"]:
            lines.append(f"Not repaired: {found['reason'] or 'repair was switched off'}.")
        else:
            lines.append("No repair was needed.")
        runs = [step for step in found["steps"] if step.get("trial") == "run"]
        if runs:
            lines.append("Runs of float layers from the input, as tried (layers: agreement on "
                         "the tuning images, share of float32's size): " + ", ".join(
                             f"{step['float_layers']}: {step['top1_agreement']:.4f}, "
                             f"{step['bytes'] / found['float32_bytes']:.2f}" for step in runs)
                         + ".")
        if found["layers"]:
            floated = set(found["float_layers"])
            lines += ["", "| layer | op | harm alone | RMSE / step | kept in float |",
                      "|---|---|---|---|---|"]
            lines += [f"| `{_cell(_short(layer['name']))}` | {layer['op']} | "
                      f"{layer['harm']:.4f} | {layer['rmse_per_step']:.3f} | "
                      f"{'yes' if layer['name'] in floated else ''} |"
                      for layer in found["layers"][:MARKDOWN_LAYERS]]
            if len(found["layers"]) > MARKDOWN_LAYERS:
                lines.append(f"\n…and {len(found['layers']) - MARKDOWN_LAYERS} more layers in "
                             "report.json.")
    return lines


def _short(name: str) -> str:
    """A converter layer name is its fused ops' names joined by ``;``, the op that writes the
    output (an activation fused into a convolution, say) first: that one names it."""
    return name.split(";")[0]


def junit(report: Report) -> bytes:
    """JUnit XML: one ``testcase`` per artifact and runtime, failures and skips as such; an
    inconclusive check is a skip of ``type="inconclusive"`` (JUnit has no third state, and CI
    systems show a skip as neither green nor red)."""
    failures = sum(check.status == FAILED for check in report.checks)
    skipped = sum(check.status in (SKIPPED, INCONCLUSIVE) for check in report.checks)
    suite = ET.Element("testsuite", name="toolchain.verify", tests=str(len(report.checks)),
                       failures=str(failures), errors="0", skipped=str(skipped),
                       time=f"{sum(check.seconds for check in report.checks):.3f}")
    properties = ET.SubElement(suite, "properties")
    accuracy = report.original_accuracy
    for name, value in (("verdict", report.verdict), ("held_out_images", len(report.images)),
                        ("architecture", report.architecture),
                        ("original_accuracy", "n/a" if accuracy is None else f"{accuracy:.4f}")):
        ET.SubElement(properties, "property", name=name, value=shown(str(value)))
    for number, text in enumerate(report.failures + report.warnings, 1):
        ET.SubElement(properties, "property", name=f"note_{number}", value=shown(text))
    for check in report.checks:  # control characters are not XML: shown() escapes them
        case = ET.SubElement(suite, "testcase", classname=f"verify.{check.target}",
                             name=shown(check.name), time=f"{check.seconds:.3f}")
        if check.status == FAILED:
            ET.SubElement(case, "failure", message=shown(_message(check))).text = \
                _case_text(check, report)
        elif check.status == SKIPPED:
            ET.SubElement(case, "skipped", message=shown(check.reason))
        elif check.status == INCONCLUSIVE:
            ET.SubElement(case, "skipped", type=INCONCLUSIVE,
                          message=shown(check.reason)).text = _case_text(check, report)
        else:
            ET.SubElement(case, "system-out").text = _case_text(check, report)
    ET.indent(suite)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n"


def _message(check: Check) -> str:
    """The failure's reason, the agreement's interval beside the agreement."""
    if check.top1_agreement is None:
        return check.reason
    figure = f"top-1 agreement {check.top1_agreement:.4f}"
    full = f"{figure} ({interval_text(check.top1_agreement_interval, check.images)})"
    if figure in check.reason:
        return check.reason.replace(figure, full, 1)
    return f"{check.reason}; {full}"


def _case_text(check: Check, report: Report) -> str:
    lines = [f"measured, not judged: {check.reason}"] if check.status == MEASURED else []
    compute = f", compute {check.compute}" if check.compute else ""
    lines += [f"precision {check.precision}{compute}, input {check.input}, "
              f"threshold {_limit(check)}",
             f"top-1 agreement {_agreement(check)}, max abs diff "
             f"{_small(check.max_abs_diff)}, accuracy {_accuracy(check.accuracy, report)}"]
    lines += [f"disagrees on {d['image']}: original {d['original']}, artifact {d['artifact']}"
              for d in check.disagreements]
    return "\n".join(shown(line) for line in lines)


def _values(values) -> str:
    """``127.5`` for three equal channels, else ``[123.7, 116.3, 103.5]``."""
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return "[" + ", ".join(f"{value:g}" for value in values) + "]"


def confusion_png(matrix: np.ndarray, labels: tuple[str, ...], title: str,
                  rows: str = "true label") -> bytes:
    """A labelled heat map of ``matrix`` (rows: ``rows``, columns: predicted), as PNG bytes."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    classes, cell, margin = len(labels), 36, 12
    names = [label if len(label) <= 24 else label[:23] + "…" for label in map(shown, labels)]
    left = max(int(font.getlength(name)) for name in names) + 2 * margin
    top = 3 * margin + 10
    caption = f"rows: {rows}, columns: predicted (same order)"
    width = max(left + classes * cell + margin, int(font.getlength(title)) + 2 * margin,
                left + int(font.getlength(caption)) + margin)
    height = top + classes * cell + 3 * margin + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, margin), title, fill="black", font=font)
    peak = max(int(matrix.max()), 1)
    for row in range(classes):
        draw.text((margin, top + row * cell + cell // 2 - 5), names[row], fill="black", font=font)
        for column in range(classes):
            count = int(matrix[row, column])
            shade = int(255 - 200 * count / peak)
            colour = (shade, shade, 255) if row == column else (255, shade, shade)
            x, y = left + column * cell, top + row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline="grey")
            text = str(count)
            draw.text((x + (cell - font.getlength(text)) / 2, y + cell // 2 - 5), text,
                      fill="black", font=font)
    draw.text((left, top + classes * cell + margin),
              caption, fill="black", font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
