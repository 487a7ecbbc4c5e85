"""Tests for atomic file output (``toolchain.atomic``): complete files or none, never debris."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from tests.privileges import as_user
from toolchain import atomic
from toolchain.errors import FolderBusy, ToolchainError, WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _fail_replace(monkeypatch, fail_on: int = 1):
    """Make the ``fail_on``-th call of os.replace (as atomic sees it) fail with ENOSPC."""
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src), Path(dst)))
        if len(calls) == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "out.json").write_text("old")
    folder.chmod(0o555)
    try:
        with as_user():  # as root too: without the power to ignore file modes
            yield folder
    finally:
        folder.chmod(0o755)


# --- writing files ------------------------------------------------------------------------------


def test_write_bytes(tmp_path):
    path = tmp_path / "model.bin"
    atomic.write_bytes(path, b"\x00\x01payload")
    assert path.read_bytes() == b"\x00\x01payload"
    atomic.write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert _listing(tmp_path) == ["model.bin"]


def test_write_text_is_utf8(tmp_path):
    path = tmp_path / "labels.txt"
    atomic.write_text(path, "crème brûlée\n日本語\n")
    assert path.read_bytes() == "crème brûlée\n日本語\n".encode()


def test_write_json(tmp_path):
    path = tmp_path / "manifest.json"
    data = {"labels": ["crème brûlée", "cats, dogs"], "n": 3, "nested": {"x": [1.5, None]}}
    atomic.write_json(path, data)
    raw = path.read_bytes()
    assert json.loads(raw.decode("utf-8")) == data
    assert "crème brûlée".encode() in raw  # not \u-escaped
    assert raw.endswith(b"}\n") and b'\n  "labels"' in raw  # indented, final newline


@pytest.mark.parametrize("writer, payload", [
    (atomic.write_bytes, b"x"), (atomic.write_text, "x"), (atomic.write_json, {"x": 1})])
def test_written_files_get_the_umask_mode(tmp_path, writer, payload):
    path = tmp_path / "out"
    writer(path, payload)
    expected = 0o666 & ~_umask()
    assert _mode(path) == expected
    assert _mode(path) != 0o600 or expected == 0o600


def test_replacing_file_gets_the_umask_mode(tmp_path):
    path = tmp_path / "model.tflite"
    with atomic.replacing(path, suffix=".tflite") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tflite.")
        assert tmp.name.endswith(".tmp.tflite")
        tmp.write_bytes(b"flatbuffer")
    assert path.read_bytes() == b"flatbuffer"
    assert _mode(path) == 0o666 & ~_umask()
    assert _listing(tmp_path) == ["model.tflite"]


# --- failures leave the old file and no debris --------------------------------------------------


@pytest.mark.parametrize("writer, payload", [
    (atomic.write_bytes, b"new"), (atomic.write_text, "new"), (atomic.write_json, ["new"])])
def test_failed_rename_keeps_old_content(tmp_path, monkeypatch, writer, payload):
    path = tmp_path / "out.json"
    path.write_text("old")
    calls = _fail_replace(monkeypatch)
    with pytest.raises(ToolchainError) as caught:
        writer(path, payload)
    assert len(calls) == 1 and calls[0][1] == path
    assert str(path) in str(caught.value) and "No space left" in str(caught.value)
    assert caught.value.hint
    assert path.read_text() == "old"
    assert _listing(tmp_path) == ["out.json"]


def test_failed_write_keeps_old_content(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic.write_bytes(path, "not bytes")  # fails inside the write, not as an OSError
    assert path.read_bytes() == b"old"
    assert _listing(tmp_path) == ["out.bin"]


def test_interrupted_write_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def interrupt(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert _listing(tmp_path) == ["out.bin"]


def test_read_only_dir_raises_toolchain_error(read_only_dir):
    path = read_only_dir / "out.json"
    with pytest.raises(ToolchainError) as caught:
        atomic.write_json(path, {"new": True})
    assert str(path) in str(caught.value) and "Permission denied" in str(caught.value)
    assert path.read_text() == "old"
    assert _listing(read_only_dir) == ["out.json"]


def test_read_only_dir_replacing_raises_toolchain_error(read_only_dir):
    path = read_only_dir / "out.json"
    with pytest.raises(ToolchainError) as caught:
        with atomic.replacing(path) as tmp:
            tmp.write_text("new")
    assert str(path) in str(caught.value)
    assert path.read_text() == "old"


def test_unwritable_location_names_the_path(tmp_path):
    """Runs as root too: a regular file where the folder should be cannot be written through."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    path = blocker / "out.json"
    for attempt in (lambda: atomic.write_json(path, {}), lambda: atomic.write_bytes(path, b"")):
        with pytest.raises(ToolchainError) as caught:
            attempt()
        assert type(caught.value) is WriteError  # the named type, not the bare base class
        assert isinstance(caught.value.__cause__, OSError)  # the cause is kept for --debug
        assert str(caught.value).startswith(f"cannot write {path}: ")
    with pytest.raises(ToolchainError, match=f"cannot write {path}"):
        with atomic.replacing(path, directory=True) as tmp:
            tmp.mkdir()
    assert _listing(tmp_path) == ["not_a_folder"]


# --- replacing ----------------------------------------------------------------------------------


def test_replacing_file_on_exception(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic.replacing(path, suffix=".keras") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert _listing(tmp_path) == ["model.keras"]


def test_replacing_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    with atomic.replacing(path) as tmp:
        tmp.write_text("hi")
    assert path.read_text() == "hi"
    assert _listing(path.parent) == ["out.txt"]


def _package(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_replacing_directory_new(tmp_path):
    path = tmp_path / "Model.mlpackage"
    with atomic.replacing(path, directory=True, suffix=".mlpackage") as tmp:
        assert not tmp.exists()  # the writer creates the folder itself
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.mlpackage")
        _package(tmp, {"Manifest.json": "{}", "Data/weights.bin": "w"})
    assert _tree(path) == {"Manifest.json": "{}", "Data/weights.bin": "w"}
    assert _listing(tmp_path) == ["Model.mlpackage"]


def test_replacing_directory_swaps_old(tmp_path):
    path = tmp_path / "Model.mlpackage"
    _package(path, {"old.txt": "old", "Data/old.bin": "o"})
    with atomic.replacing(path, directory=True) as tmp:
        _package(tmp, {"new.txt": "new"})
    assert _tree(path) == {"new.txt": "new"}
    assert _listing(tmp_path) == ["Model.mlpackage"]  # no .tmp, no .old


def test_replacing_directory_on_exception(tmp_path):
    path = tmp_path / "Model.mlpackage"
    _package(path, {"old.txt": "old"})
    with pytest.raises(RuntimeError, match="conversion failed"):
        with atomic.replacing(path, directory=True) as tmp:
            _package(tmp, {"partial.txt": "half"})
            raise RuntimeError("conversion failed")
    assert _tree(path) == {"old.txt": "old"}
    assert _listing(tmp_path) == ["Model.mlpackage"]


def test_replacing_directory_writer_created_nothing(tmp_path):
    path = tmp_path / "Model.mlpackage"
    _package(path, {"old.txt": "old"})
    with pytest.raises(ToolchainError, match=f"cannot write {path}"):
        with atomic.replacing(path, directory=True):
            pass
    assert _tree(path) == {"old.txt": "old"}
    assert _listing(tmp_path) == ["Model.mlpackage"]


@pytest.mark.parametrize("fail_on", [1, 2])
def test_replacing_directory_failed_swap_keeps_old(tmp_path, monkeypatch, fail_on):
    """Either rename of the swap may fail (ENOSPC, EXDEV, ...): the old folder must survive."""
    path = tmp_path / "Model.mlpackage"
    _package(path, {"old.txt": "old"})
    calls = _fail_replace(monkeypatch, fail_on)
    with pytest.raises(ToolchainError) as caught:
        with atomic.replacing(path, directory=True) as tmp:
            _package(tmp, {"new.txt": "new"})
    assert len(calls) >= fail_on
    assert str(path) in str(caught.value)
    assert _tree(path) == {"old.txt": "old"}
    assert _listing(tmp_path) == ["Model.mlpackage"]


def test_replacing_directory_interrupted_swap_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "Model.mlpackage"
    _package(path, {"old.txt": "old"})
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(path, directory=True) as tmp:
            _package(tmp, {"new.txt": "new"})
    assert _tree(path) == {"old.txt": "old"}
    assert _listing(tmp_path) == ["Model.mlpackage"]


# --- sweeping what killed writers left ----------------------------------------------------------


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def _owned_by(path: Path, pid: int, host: str | None = None, kind: str = "tmp") -> Path:
    """A temporary name as ``atomic`` makes them, for writer ``pid`` on ``host``."""
    return path.parent / f".{path.name}.{host or atomic._HOST}-{pid}.a1b2c3d4.{kind}"


def test_temporary_names_carry_host_and_pid(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (seen.append(Path(src)),
                                                                real(src, dst)))
    atomic.write_bytes(tmp_path / "a.bn", b"x")
    with atomic.replacing(tmp_path / "b.tflite", suffix=".tflite") as tmp:
        tmp.write_bytes(b"y")
    with atomic.replacing(tmp_path / "C.mlpackage", directory=True) as tmp:
        tmp.mkdir()
    for name, path in zip(("a.bn", "b.tflite", "C.mlpackage"), seen):
        match = atomic._TEMP_NAME.match(path.name)
        assert match, path.name
        assert (match["name"], match["host"], int(match["pid"])) == (name, atomic._HOST,
                                                                      os.getpid())


def test_sweep_removes_only_what_dead_writers_on_this_host_left(tmp_path):
    dead = _dead_pid()
    final = tmp_path / "abc.bn"
    final.write_bytes(b"complete")
    stale_file = _owned_by(final, dead)
    stale_file.write_bytes(b"half")
    stale_dir = _owned_by(tmp_path / "M.mlpackage", dead)
    stale_dir.mkdir()
    (stale_dir / "weights.bin").write_bytes(b"half")
    live = _owned_by(final, os.getpid())
    live.write_bytes(b"being written")
    elsewhere = _owned_by(final, dead, host="ffffff" if atomic._HOST != "ffffff" else "000000")
    elsewhere.write_bytes(b"another machine's")
    unrelated = tmp_path / ".DS_Store"
    unrelated.write_bytes(b"user's")
    assert atomic.sweep(tmp_path) == 2
    assert _listing(tmp_path) == sorted([".DS_Store", elsewhere.name, live.name, "abc.bn"])
    assert final.read_bytes() == b"complete"


def test_sweep_puts_back_a_folder_whose_swap_was_killed(tmp_path):
    dead = _dead_pid()
    package = tmp_path / "Model.mlpackage"
    old = _owned_by(package, dead, kind="old")
    _package(old, {"old.txt": "old"})
    assert atomic.sweep(tmp_path) == 1
    assert _tree(package) == {"old.txt": "old"}
    old = _owned_by(package, dead, kind="old")  # the swap got further: the new one is in place
    _package(old, {"older.txt": "older"})
    assert atomic.sweep(tmp_path) == 1
    assert _tree(package) == {"old.txt": "old"} and _listing(tmp_path) == ["Model.mlpackage"]


def test_sweep_of_a_missing_folder_is_quiet(tmp_path):
    assert atomic.sweep(tmp_path / "absent") == 0


# --- one writer per output folder -----------------------------------------------------------------

_HOLD = """
import sys, time
from toolchain import atomic
with atomic.exclusive(sys.argv[1], "build"):
    print("holding", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(FolderBusy) as caught, atomic.exclusive(out, "convert"):
            pytest.fail("took a lock another process holds")
        assert caught.value.message.startswith(
            f"another toolchain build (pid {holder.pid} on "), caught.value.message
        assert caught.value.message.endswith(f"is writing {out}")
        assert "another --output-dir" in caught.value.hint
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the lock with its holder (kill -9): nothing stale blocks the next run.
    with atomic.exclusive(out, "convert"):
        assert json.loads(atomic.lock_file(out).read_text())["command"] == "convert"
    assert atomic.lock_file(out).parent == tmp_path and atomic.lock_file(out).name == ".out.lock"


def test_a_lock_is_one_per_open_even_in_one_process(tmp_path):
    with atomic.exclusive(tmp_path / "out", "build"):
        with pytest.raises(FolderBusy), atomic.exclusive(tmp_path / "out", "build"):
            pytest.fail("locked twice")
    with atomic.exclusive(tmp_path / "out", "build"):  # released on leaving the block
        pass


def test_a_hostile_lock_record_is_not_shown_raw(tmp_path):
    import fcntl

    out = tmp_path / "out"
    atomic.lock_file(out).write_text('{"command": "build\\u001b[2J", "pid": 1, "host": "h", '
                                     '"started": "now"}')
    fd = os.open(atomic.lock_file(out), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FolderBusy) as caught, atomic.exclusive(out, "build"):
            pass
        assert "\x1b" not in caught.value.message and "build?[2J (pid 1 on h" in \
            caught.value.message
    finally:
        os.close(fd)
