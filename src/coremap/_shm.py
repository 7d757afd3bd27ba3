"""Shared-memory segments: private, reserved up front, owned by their creator.

Written on CPython's ``_posixshmem`` (what ``multiprocessing.shared_memory``
uses underneath) rather than on ``SharedMemory`` itself, because
``SharedMemory`` registers every attachment with a resource tracker, which
then unlinks segments the parent still uses (gh-82300). Here:

* the creator owns a segment and is the only one that unlinks it (at ``unlink()``,
  when its last Python reference goes, or at exit); attaching processes never
  register anything and never unlink;
* a segment is created with ``O_CREAT | O_EXCL`` and mode 0600 (``fchmod`` after
  creation, so the umask cannot widen it), under a name with 64 random bits:
  ``coremap_<creator pid>_<16 hex digits>``; a name that exists is never reused;
* its space is reserved with ``posix_fallocate`` before anyone touches it, so a
  full /dev/shm is an ``OSError`` at creation, never a SIGBUS later;
* ``cleanup_stale()`` removes segments whose creator pid is dead, never one whose
  creator lives.

A segment starts with a 64-byte header (the lock word of ``SharedArray.lock``);
the data follows, 64-byte aligned.
"""
from __future__ import annotations

import errno
import mmap
import os
import secrets
import weakref

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

PREFIX = "coremap_"
HEADER = 64
SHM_DIR = "/dev/shm"

_attached: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _require_posix() -> None:
    if _posixshmem is None:  # pragma: no cover
        raise OSError("coremap's shared memory needs a POSIX system (Linux or macOS)")


def _unlink_name(name: str, creator: int) -> None:
    # Only the creating process unlinks: a forked child inherits this finalizer.
    if os.getpid() != creator:
        return
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


class Segment:
    """One mapped shared-memory segment (see the module docstring)."""

    __slots__ = ("name", "size", "mmap", "owner", "address", "_finalizer", "__weakref__")

    def __init__(self, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.mmap = mm
        self.size = len(mm)
        self.owner = owner
        import ctypes

        probe = ctypes.c_char.from_buffer(mm)
        self.address = ctypes.addressof(probe)
        del probe  # release the buffer export at once
        self._finalizer = (
            weakref.finalize(self, _unlink_name, name, os.getpid()) if owner else None
        )

    @classmethod
    def create(cls, nbytes: int) -> Segment:
        """A new segment with room for ``nbytes`` of data (reserved, zero-filled)."""
        _require_posix()
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        total = HEADER + max(int(nbytes), 1)
        for _ in range(16):
            name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(8)}"
            try:
                fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                continue  # taken (or planted): never attach to it, pick another name
            break
        else:  # pragma: no cover - 16 collisions of 64 random bits
            raise FileExistsError("could not find a free shared-memory name")
        try:
            os.fchmod(fd, 0o600)
            _reserve(fd, total)
            mm = mmap.mmap(fd, total)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            raise
        os.close(fd)
        return cls(name, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment by name (never registers it, never unlinks it)."""
        _require_posix()
        seg = _attached.get(name)
        if seg is not None:
            return seg
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"not a coremap segment name: {name!r}")
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0o600)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        seg = cls(name, mm, owner=False)
        _attached[name] = seg
        return seg

    def unlink(self) -> None:
        """Remove the name (owner only). Existing mappings stay valid."""
        if self._finalizer is not None:
            self._finalizer()

    def close(self) -> None:
        """Drop this object's hold on the mapping; it is unmapped with its last array.

        Never ``mmap.close()``: arrays made with ``np.ndarray(buffer=mm)`` keep the
        mmap object alive but hold no buffer export, so an explicit close would
        unmap memory they still point to.
        """
        self.mmap = None

    @property
    def data_bytes(self) -> int:
        return self.size - HEADER


def _reserve(fd: int, total: int) -> None:
    """Reserve ``total`` bytes now, so a full /dev/shm fails here and not with SIGBUS."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, total)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                free = _free_bytes()
                raise OSError(
                    exc.errno,
                    f"not enough shared memory for {total:,} bytes"
                    + (f" ({free:,} bytes free in {SHM_DIR})" if free is not None else "")
                    + "; free some, enlarge /dev/shm, or use smaller inputs",
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    os.ftruncate(fd, total)  # pragma: no cover - filesystems without fallocate


def _free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


def creator_pid(name: str) -> int | None:
    """The pid of the process that created segment ``name`` (None if not a coremap name)."""
    parts = name[len(PREFIX):].split("_") if name.startswith(PREFIX) else []
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0])


def list_segments() -> list[str]:
    """Names of the coremap segments in /dev/shm."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:  # pragma: no cover - no /dev/shm (macOS)
        return []


def cleanup_stale() -> list[str]:
    """Remove segments left behind by dead processes; return their names.

    A segment's creator pid is part of its name. Segments whose creator is alive
    are never touched, whoever that creator is.

    Examples
    --------
    >>> import coremap as cm
    >>> removed = cm.cleanup_stale()
    """
    removed = []
    for name in list_segments():
        parts = name[len(PREFIX):].split("_")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        if _pid_alive(int(parts[0])):
            continue
        try:
            _posixshmem.shm_unlink("/" + name)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
