"""Atomic file output: a file appears under its final name complete, or not at all.

Everything the toolchain writes (cache entries, models, labels, reports) goes through here:
data is written to a temporary sibling and renamed with ``os.replace``, which is atomic on
POSIX file systems. An interrupted run leaves at most a hidden ``.*.tmp`` file, never a
half-written model under its final name.

Temporary names carry the writer's host and process id, so :func:`sweep` can remove what a
killed run left behind (SIGKILL, power loss) without touching the files of a run that is still
writing, such as a second build sharing the bottleneck cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from toolchain.errors import FolderBusy, UsageError, WriteError

#: This host, in temporary names: a process id means nothing on another machine sharing a folder.
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:6]
#: ``.<name>.<host>-<pid>.<random>.tmp<suffix>`` (or ``.old`` during a folder swap).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[a-z0-9_]+"
                        r"\.(?P<kind>tmp|old)")


def _owner() -> str:
    return f"{_HOST}-{os.getpid()}"


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    """Create a new, empty, uniquely named file beside ``path``.

    Created with mode 0666 so that the kernel applies the process umask, as for any output
    (``mkstemp`` would make it 0600).
    """
    for _ in range(100):
        name = path.parent / f".{path.name}.{_owner()}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _describe(error: OSError, path: Path) -> WriteError:
    reason = error.strerror or str(error)
    return WriteError(f"cannot write {path}: {reason}",
                      hint="check that the folder exists, is writable and has free space")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (creating its folder if needed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(path)
    except OSError as error:
        raise _describe(error, path) from error
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _describe(error, path) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove that a file can be written in it.

    Stages call this before long work, so a read-only or missing output folder is a one-line
    error in seconds rather than a crash after an hour of extraction and training.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _temp_sibling(folder / "write-check").unlink()
    except OSError as error:
        raise WriteError(f"cannot write to {folder}: {error.strerror or error}",
                         hint="pass a writable folder with free space") from error


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    """Write pretty, UTF-8 JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def replacing(path: Path, *, directory: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    For writers that want a path rather than bytes (Keras ``save``, coremltools' ``.mlpackage``
    directories). ``suffix`` keeps an extension that the writer insists on. On failure or
    interruption the temporary file or folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=f".tmp{suffix}",
                                        dir=path.parent))
            tmp.rmdir()  # writers such as coremltools want to create the folder themselves
        else:
            tmp = _temp_sibling(path, suffix)
    except OSError as error:
        raise _describe(error, path) from error
    try:
        yield tmp
        if directory and path.is_dir():
            # Directories cannot be replaced in one rename: swap via a second temporary name.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".old",
                                        dir=path.parent))
            old.rmdir()
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old folder back: ``path`` must stay untouched
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as error:
        remove(tmp)
        raise _describe(error, path) from error
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Remove a file or a folder artifact (``.mlpackage``), if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def sweep(folder: Path) -> int:
    """Clean up after writers on this host that died mid-write; returns how many were handled.

    Temporary files and folders of dead processes are removed. A ``.old`` folder is the previous
    version of a folder artifact that was being swapped when its writer died: it is put back
    under its final name if nothing took that name, else removed. Temporary names of live
    processes and of other hosts are left alone; a missing or unreadable folder is not an error
    (the caller's own writes report those).
    """
    folder = Path(folder)
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.startswith(".")]
    except OSError:
        return 0
    handled = 0
    for name in names:
        match = _TEMP_NAME.match(name)
        if not match or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        stale = folder / name
        final = folder / match["name"]
        try:
            if match["kind"] == "old" and not final.exists():
                os.replace(stale, final)
            else:
                remove(stale)
            handled += 1
        except OSError:
            continue
    return handled


def new_folder(out_dir: Path, marker: str, params: dict, fill: Callable[[Path], None], *,
               foreign: str, hint: str,
               complete: Callable[[Path], bool] = lambda folder: True) -> bool:
    """Write a folder that never replaces anything of the user's: ``fill(tmp)`` builds it in a
    temporary sibling, the file ``marker`` records ``params``, and it is renamed into place.

    Returns False, writing nothing, when ``out_dir`` already holds exactly these ``params``
    (and ``complete(out_dir)``): a rerun is a no-op. An existing folder that is not empty and
    not ours is ``UsageError(foreign, hint)``, before the work or after it (it appeared
    meanwhile; rename(2) replaces an empty directory, never a non-empty one or a file). An
    ``OSError`` (disk full, read-only folder) is one ``WriteError``; nothing partial is left.
    Used by ``sample-data`` for the drawn scenes and for CIFAR-10.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        try:
            found = json.loads((out_dir / marker).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if found == params and complete(out_dir):
            return False
        if out_dir.is_symlink() or not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UsageError(foreign, hint=hint)
    target, tmp = out_dir.absolute(), None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        fill(tmp)
        (tmp / marker).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        probe = tmp / ".mode"  # mkdtemp's 0700 -> what the umask gives a new folder
        probe.mkdir()
        os.chmod(tmp, probe.stat().st_mode & 0o777)
        probe.rmdir()
        try:
            os.replace(tmp, target)
        except OSError:
            if not os.path.lexists(target):
                raise
            raise UsageError(foreign, hint=hint) from None
    except BaseException as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise WriteError(f"cannot write {out_dir}: {error.strerror or error}",
                             hint="check that the folder is writable and has free space") from error
        raise
    return True


def lock_file(folder: Path) -> Path:
    """The hidden file beside ``folder`` whose lock :func:`exclusive` takes."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def exclusive(folder: Path, command: str) -> Iterator[None]:
    """Hold the one-writer lock of the output folder ``folder`` while the block runs.

    A second ``build``, ``convert`` or ``retrain`` writing the same folder meanwhile gets one
    :class:`FolderBusy` naming the holder (its command, process id and start time) instead of
    mixing its files with the first's. The lock is ``flock(2)`` on :func:`lock_file`: the kernel
    releases it when the holder's process ends, however it ends (kill -9 included), so a dead
    run never blocks the next one and there is nothing stale to clean. The file stays, empty of
    meaning once unlocked: removing it would let a third process lock a file the second has
    already opened. Taking the lock twice in one process fails too (locks are per open file).
    """
    import fcntl

    folder = Path(folder).absolute()
    path = lock_file(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise _describe(error, folder) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{_holder(fd)} is writing {folder}",
                             hint="wait for it to finish, or pass another --output-dir") from None
        record = {"command": command, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """``another toolchain build (pid 123 on host, since ...)``, from the lock file's record
    (read within a small limit: anyone may have written it)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        what = (f"another toolchain {str(record['command'])[:20]} (pid {int(record['pid'])} "
                f"on {str(record['host'])[:64]}, since {str(record['started'])[:19]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another toolchain run"
    return "".join(char if char.isprintable() else "?" for char in what)
