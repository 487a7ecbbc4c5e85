"""Reading files from strangers: sizes checked before reading, archives scanned no further than
their limit, JSON of bounded size and depth, Keras files by their bytes, not their names.

Every refusal is one :class:`~toolchain.errors.UnsafeModel` line naming the file and the limit.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

from toolchain.errors import ModelError, UnsafeModel
from toolchain.untrusted import LIMITS, shown, size_text

#: The first bytes of a zip archive (the Keras v3 ``.keras`` format) and of an HDF5 file.
ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path`` if it holds at most ``limit``; OSError when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise UnsafeModel(f"{what} {shown(str(path))} is {size_text(size)}, more than the limit "
                          f"of {size_text(limit)}; it is not read")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew since stat
        raise UnsafeModel(f"{what} {shown(str(path))} is more than the limit of "
                          f"{size_text(limit)}; it is not read")
    return data


def tar_members(archive: tarfile.TarFile, path: Path,
                limit: int = LIMITS.archive_bytes) -> list[tarfile.TarInfo]:
    """The regular files of an open archive, read header by header: an archive whose members
    declare more than ``limit`` bytes in all is refused before the rest is decompressed."""
    members, total = [], 0
    while (member := archive.next()) is not None:
        total += max(member.size, 0)
        if total > limit:
            raise UnsafeModel(f"{shown(str(path))} declares more than {size_text(limit)} of "
                              "files; it is not unpacked")
        if member.isfile():
            members.append(member)
    return members


def check_member(path: Path, member: tarfile.TarInfo, limit: int) -> None:
    """Refuse an archive member larger than ``limit`` before it is extracted."""
    if member.size > limit:
        raise UnsafeModel(f"{shown(member.name)} in {shown(str(path))} is "
                          f"{size_text(member.size)} unpacked, more than the limit of "
                          f"{size_text(limit)}; it is not extracted")


def relative_inside(item: object) -> bool:
    """Whether ``item``, a path a file from a stranger names, is a relative path that cannot
    climb out of the folder it is joined to: a non-empty string, not absolute, no ``..``."""
    if not isinstance(item, str) or not item:
        return False
    return not Path(item).is_absolute() and ".." not in Path(item).parts


def read_json(path: Path, max_bytes: int = LIMITS.json_bytes):
    """:func:`load_json` of a file; OSError when it cannot be read, ValueError when it is not
    JSON."""
    return load_json(read_limited(path, max_bytes, "JSON file"), str(path), max_bytes=max_bytes)


def load_json(data: bytes, where: str, limits=LIMITS, max_bytes: int | None = None):
    """JSON from a model file: at most ``limits.json_bytes`` (or ``max_bytes``) and
    ``limits.json_depth`` deep (a document nested 100,000 deep exhausts Python's stack);
    ValueError when it is not JSON."""
    max_bytes = limits.json_bytes if max_bytes is None else max_bytes
    if len(data) > max_bytes:
        raise UnsafeModel(f"{shown(where)} is {size_text(len(data))}, more than the limit of "
                          f"{size_text(max_bytes)} for JSON in a model")
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:  # brackets outside strings; a scan, not a parse, so it cannot recurse
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limits.json_depth:
                raise UnsafeModel(f"{shown(where)} nests more than {limits.json_depth} deep, "
                                  "more than JSON in a model needs")
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return json.loads(data)


def keras_format(path: Path) -> str:
    """``zip`` (the Keras v3 format, which ``safe_mode`` covers), or a one-line refusal: an HDF5
    file (or anything else) named ``.keras`` is loaded by Keras' legacy path, where
    ``safe_mode`` does not apply and a Lambda layer's code runs."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    kind = "an HDF5 file" if head == HDF5_MAGIC else "not a zip archive"
    raise UnsafeModel(f"{shown(str(path))} is {kind}, not the Keras v3 .keras format; Keras "
                      "would load it without safe mode (a Lambda layer's code would run), so it "
                      "is not opened",
                      hint="save the model with model.save('model.keras') in Keras 2.13 or newer")


#: Where an .mlpackage keeps its items, and the file that lists them.
PACKAGE_DATA, PACKAGE_MANIFEST = "Data", "Manifest.json"


def check_package(path: Path, limits=LIMITS) -> None:
    """Refuse an ``.mlpackage`` folder unless it holds only regular files and folders (no link,
    device, pipe or socket: a link would let a reader, or ``install``'s copy, reach outside it)
    and every item its ``Manifest.json`` names resolves inside its ``Data`` folder.

    coremltools' package reader follows the manifest's paths wherever they lead (a model path of
    ``../../other/model.mlmodel`` or ``/etc/passwd`` is opened and parsed), so this runs first."""
    path = Path(path)
    where = shown(str(path))
    if path.is_symlink() or not path.is_dir():
        raise UnsafeModel(f"{where} is not a folder (an .mlpackage is one); it is not opened")
    total = 0
    for folder, dirnames, filenames in os.walk(path):  # never follows links
        for name in dirnames + filenames:
            entry = Path(folder) / name
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise UnsafeModel(f"{where} holds a link, {shown(str(entry.relative_to(path)))}; "
                                  "a package holds files only, so it is not opened")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeModel(f"{where} holds {shown(str(entry.relative_to(path)))}, which "
                                  "is not a regular file; it is not opened")
            if stat.S_ISREG(mode):
                total += entry.lstat().st_size
    if total > limits.model_bytes:
        raise UnsafeModel(f"{where} holds {size_text(total)} of files, more than the limit of "
                          f"{size_text(limits.model_bytes)}")
    manifest = path / PACKAGE_MANIFEST
    if not manifest.is_file():
        raise ModelError(f"{where} has no {PACKAGE_MANIFEST}; it is not an .mlpackage")
    try:
        document = load_json(read_limited(manifest, limits.json_bytes, "package manifest"),
                             f"{PACKAGE_MANIFEST} of {path}", limits)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {PACKAGE_MANIFEST} of {where}: {error}") from error
    entries = document.get("itemInfoEntries") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or document.get("rootModelIdentifier") not in entries:
        raise ModelError(f"{PACKAGE_MANIFEST} of {where} lists no root model")
    data = (path / PACKAGE_DATA).resolve()
    for entry in entries.values():
        item = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(item, str) or not item:
            raise ModelError(f"{PACKAGE_MANIFEST} of {where} has an item without a path")
        inside = (data / item).resolve()
        if not relative_inside(item) or data not in (inside, *inside.parents):
            raise UnsafeModel(f"{PACKAGE_MANIFEST} of {where} points outside the package "
                              f"('{shown(item)}'); it is not opened")
