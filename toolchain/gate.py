"""Only a verified model reaches an app: which of the verifier's verdicts covers an artifact's
bytes.

The verifier records, in ``report.json``'s ``files``, each artifact it checked: its name, its
SHA-256 and size as they were when it was checked, and one verdict for the file (:func:`files`):
``passed`` when every row of it passed (a full-size row shown without a verdict does not count
against it, a skipped one does), ``failed`` with the first failing row's reason, ``skipped``
when no runtime here could run it, ``inconclusive`` when no row failed but one met its threshold
on too few images to show it. ``install`` asks :func:`verdict` for the file it is about to
copy, which reads the ``report.json`` beside it and answers:

- ``passed``: a passing verdict covers exactly these bytes;
- ``failed``, ``skipped`` or ``inconclusive``: the verifier checked these bytes and did not pass
  them;
- ``stale``: the report names a file of this name with other bytes (a model rebuilt, edited or
  replaced since it was verified);
- ``unverified``: no report beside it, or one that does not name it.

The report beside an artifact may be a stranger's like the artifact itself: it is read within
the JSON limits (``toolchain.untrusted``), and it can only ever vouch for the bytes whose digest
it records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolchain.checks import FAILED as ROW_FAILED
from toolchain.checks import INCONCLUSIVE as ROW_INCONCLUSIVE
from toolchain.checks import PASSED as ROW_PASSED
from toolchain.checks import SKIPPED as ROW_SKIPPED
from toolchain.errors import ModelError, first_line
from toolchain.untrusted import LIMITS, shown
from toolchain.untrusted.files import read_json

#: The verifier's report, in a build's output folder and (by default) beside verified artifacts.
REPORT = "report.json"
PASSED, FAILED, SKIPPED, STALE, UNVERIFIED = "passed", "failed", "skipped", "stale", "unverified"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """What the verifier said of one artifact's current bytes (see the module docstring)."""

    status: str
    reason: str
    sha256: str
    report: Path | None = None
    #: Images the passing or failing verdict was reached on.
    images: int = 0

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def record(self) -> dict:
        return {"verdict": self.status, "reason": self.reason, "sha256": self.sha256,
                "report": None if self.report is None else str(self.report),
                "held_out_images": self.images}


def files(report) -> list[dict]:
    """``report.json``'s ``files``: one entry per artifact a :class:`Report` checked, with the
    digest and size recorded before it was measured."""
    entries = []
    for path, (digest, size) in report.files.items():
        rows = [check for check in report.checks if str(check.path) == path]
        failed = [check for check in rows if check.status in (ROW_FAILED, ROW_SKIPPED)]
        unsure = [check for check in rows if check.status == ROW_INCONCLUSIVE]
        if report.failures:
            status, reason = FAILED, "; ".join(report.failures)
        elif failed:
            status = FAILED if failed[0].status == ROW_FAILED else SKIPPED
            reason = f"{failed[0].name}: {failed[0].reason}"
        elif unsure:
            status, reason = INCONCLUSIVE, f"{unsure[0].name}: {unsure[0].reason}"
        elif any(check.status == ROW_PASSED for check in rows):
            status, reason = PASSED, ""
        else:
            status, reason = SKIPPED, "no row of it was judged"
        entries.append({"name": Path(path).name, "path": path, "sha256": digest, "bytes": size,
                        "verdict": status, "reason": reason, "images": len(report.images)})
    return entries


def verdict(path: Path) -> Verdict:
    """The verdict covering ``path``'s current bytes, from the ``report.json`` beside it."""
    import targets

    path = Path(path)
    digest = targets.artifact_digest(path)
    report = path.parent / REPORT
    if not report.is_file():
        return Verdict(UNVERIFIED, f"no {REPORT} beside it", digest)
    try:
        entries = read_json(report, LIMITS.split_bytes).get("files")
    except (OSError, ValueError, AttributeError, ModelError) as error:
        reason = error.message if isinstance(error, ModelError) else first_line(error)
        return Verdict(UNVERIFIED, f"{REPORT} cannot be read ({reason})", digest, report)
    if not isinstance(entries, list):
        return Verdict(UNVERIFIED, f"{REPORT} records no file digests (written before "
                                   "install checked them)", digest, report)
    named = [entry for entry in entries
             if isinstance(entry, dict) and entry.get("name") == path.name]
    for entry in named:
        if entry.get("sha256") == digest:
            status = entry.get("verdict")
            status = status if status in (PASSED, FAILED, SKIPPED, INCONCLUSIVE) else FAILED
            return Verdict(status, shown(str(entry.get("reason") or "")), digest, report,
                           int(entry.get("images") or 0))
    if named:
        return Verdict(STALE, f"{REPORT} verified other bytes under this name (sha256 "
                              f"{str(named[0].get('sha256'))[:12]}..., now {digest[:12]}...): it "
                              "was rebuilt or replaced after it was verified", digest, report)
    return Verdict(UNVERIFIED, f"{REPORT} does not name it", digest, report)
