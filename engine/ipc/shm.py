"""Shared-memory arenas: preallocated segments holding typed numpy arrays at fixed offsets.

The master creates each arena once (a file under /dev/shm with an unguessable name and
mode 0600), agents attach by name, and every step reads and writes the same views: no
allocation and no serialization of bulk arrays on the hot path.

Segments are plain files opened with `os`, not `multiprocessing.shared_memory`: that one
registers attached segments with the resource tracker, which unlinks (and warns about)
them when an attaching process exits. Here only the creator unlinks: explicitly
(`unlink`), as soon as every agent has attached (the name is needed only to attach), at
exit, and on SIGTERM/SIGINT/SIGHUP.
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets
import signal
import threading
from dataclasses import dataclass

import numpy as np

SHM_DIR = "/dev/shm"
NAME_PREFIX = "llmtrace-"
ALIGN = 64  # each array starts on its own cache line


class ShmError(Exception):
    """An arena cannot be created or attached."""


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


class ArenaLayout:
    """Ordered fields at fixed, aligned offsets; both sides derive the same offsets from it."""

    def __init__(self, fields: list[Field]):
        self.fields = tuple(fields)
        self.offsets: dict[str, int] = {}
        off = 0
        for f in self.fields:
            self.offsets[f.name] = off
            off += -(-f.nbytes // ALIGN) * ALIGN
        self.size = max(off, ALIGN)

    def to_wire(self) -> list:
        return [[f.name, f.dtype, list(f.shape)] for f in self.fields]

    @classmethod
    def from_wire(cls, v: list) -> ArenaLayout:
        return cls([Field(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in v])


class ShmArena:
    """One segment and its views: `arena["token_ids"]` is a numpy array living in shared memory."""

    def __init__(self, name: str, layout: ArenaLayout, mm: mmap.mmap, owner: bool):
        self.name, self.layout, self.owner = name, layout, owner
        self._mm = mm
        self.arrays = {
            f.name: np.ndarray(f.shape, np.dtype(f.dtype), buffer=mm, offset=layout.offsets[f.name])
            for f in layout.fields
        }

    @classmethod
    def create(cls, layout: ArenaLayout) -> ShmArena:
        name = NAME_PREFIX + secrets.token_hex(16)
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ShmError(f"cannot create shared memory {path}: {e}") from None
        _registry.add(name)
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            os.ftruncate(fd, layout.size)
            mm = mmap.mmap(fd, layout.size)
        except OSError as e:
            unlink_name(name)
            raise ShmError(f"cannot size shared memory {path} to {layout.size} bytes: {e}") from None
        finally:
            os.close(fd)
        return cls(name, layout, mm, owner=True)

    @classmethod
    def attach(cls, name: str, layout: ArenaLayout) -> ShmArena:
        if not name.startswith(NAME_PREFIX) or "/" in name:
            raise ShmError(f"not an arena name: {name!r}")
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmError(f"cannot attach shared memory {path}: {e}") from None
        try:
            size = os.fstat(fd).st_size
            if size < layout.size:
                raise ShmError(f"shared memory {path} has {size} bytes, the layout needs {layout.size}")
            mm = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        return cls(name, layout, mm, owner=False)

    def __getitem__(self, field: str) -> np.ndarray:
        return self.arrays[field]

    def to_wire(self) -> dict:
        return {"name": self.name, "layout": self.layout.to_wire()}

    def unlink(self) -> None:
        """Remove the name (the creator's job); mappings already made stay valid."""
        if self.owner:
            unlink_name(self.name)

    def close(self) -> None:
        """Drop this arena's references to the mapping. It is unmapped when the last view
        of it is freed: numpy views do not pin the mmap against an explicit close(), so
        closing it here could leave a view pointing at unmapped memory."""
        self.arrays = {}
        self._mm = None


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


class _Registry:
    """Names this process created and has not unlinked yet; removed on every exit path."""

    def __init__(self):
        self.names: set[str] = set()
        self.lock = threading.RLock()  # the signal handler may run while the main thread holds it
        self.hooked = False

    def add(self, name: str) -> None:
        with self.lock:
            self.names.add(name)
            if not self.hooked:
                self.hooked = True
                atexit.register(unlink_all)
                _install_signal_hooks()


_registry = _Registry()


def unlink_name(name: str) -> None:
    with _registry.lock:
        _registry.names.discard(name)
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def unlink_all() -> None:
    with _registry.lock:
        names = list(_registry.names)
    for name in names:
        unlink_name(name)


def owned_names() -> list[str]:
    with _registry.lock:
        return sorted(_registry.names)


def _install_signal_hooks() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; atexit still covers normal exits
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN or prev is None:
            continue
        signal.signal(sig, _chain(sig, prev))


def _chain(sig, prev):
    def handler(signum, frame):
        unlink_all()
        if callable(prev):
            prev(signum, frame)
        else:  # SIG_DFL: die of the same signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler
