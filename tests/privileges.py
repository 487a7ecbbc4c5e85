"""Make permission tests real when the tests run as root (CI and these machines do).

Root ignores file modes through two capabilities, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH.
Without them root is held to the owner's permission bits like any user, so a ``chmod 555``
folder is read-only for real. :func:`as_user` drops them for the calling thread (Linux keeps
capabilities per thread) and restores them after; :func:`drop_in_child` is a ``preexec_fn``
that removes them from a child process's bounding set, so the whole child and every thread it
starts runs without them. Both do nothing for a non-root user, who is held to file modes anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import pytest

_CAPS = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def as_user():
    """Run the block in this thread without root's power to ignore file modes."""
    if os.geteuid() != 0:
        yield
        return
    libc = _libc()
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip(f"cannot read capabilities: {os.strerror(ctypes.get_errno())}")
    saved = data[0].effective
    mask = sum(1 << cap for cap in _CAPS)
    data[0].effective &= ~mask
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(_Header(_VERSION_3, 0)), data)


def drop_in_child() -> None:
    """``preexec_fn``: the child (root or not) is held to file modes like any user."""
    if os.geteuid() != 0:
        return
    libc = _libc()
    for cap in _CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
