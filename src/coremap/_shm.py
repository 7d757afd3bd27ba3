"""Shared-memory segments: private, reserved up front, owned by their creator.

Written on CPython's ``_posixshmem`` (what ``multiprocessing.shared_memory``
uses underneath) rather than on ``SharedMemory`` itself, because
``SharedMemory`` registers every attachment with a resource tracker, which
then unlinks segments the parent still uses (gh-82300). Here:

* the creator owns a segment and is the only one that unlinks it (at ``unlink()``,
  when its last Python reference goes, or at exit); attaching processes never
  register anything and never unlink;
* a segment is created with ``O_CREAT | O_EXCL`` and mode 0600 (``fchmod`` after
  creation, so the umask cannot widen it), under the name
  ``coremap_<creator pid>_<namespace tag>_<random>`` (30 characters at most, within
  macOS's 31 for ``/`` + name; 45 random bits); a name that exists is never reused;
* its space is reserved with ``posix_fallocate`` before anyone touches it, so a
  full /dev/shm is an ``OSError`` at creation, never a SIGBUS later;
* the creator holds a shared ``flock`` on the segment while it has it mapped: the
  lock is taken on the descriptor that ``mmap`` duplicates, so it costs no extra
  descriptor and ends with the mapping, or when the creator dies;
* ``cleanup_stale()`` removes a segment only when all of these hold: its
  namespace tag is this process's (a hash of the boot id and the pid namespace:
  a pid from another container sharing /dev/shm means nothing here), its
  creator pid is dead, and its lock can be taken (nobody holds it). What cannot
  be opened or removed (another user's file) is skipped: cleaning is best effort.

A segment starts with a 64-byte header (the lock word of ``SharedArray.lock``);
the data follows, 64-byte aligned.

Arrays in segments live here too, below every user of them::

    Segment ──array_in()──> SegmentArray (an ndarray; views keep ``_segment``
                            while they stay inside it)
              ├─ shared.SharedArray: the public subclass (pickled by name)
              └─ the process engine's pooled operands
    segment_of(view, origin) ──> the Segment holding a view's elements, or None:
              how the process engine attaches a SharedArray by name, not a copy
"""
from __future__ import annotations

import base64
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import secrets
import weakref
from collections.abc import Collection
from typing import Literal, TypeVar, overload

import numpy as np
from numpy.typing import DTypeLike

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

PREFIX = "coremap_"
HEADER = 64
SHM_DIR = "/dev/shm"
NAME_MAX = 30  # macOS: "/" + name within PSHMNAMLEN (31); Linux allows 255
TAG_CHARS = 4  # base32: 20 bits of (boot id, pid namespace)
RANDOM_CHARS = 9  # base32: 45 bits

Order = Literal["C", "F"]

_attached: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _require_posix() -> None:
    if _posixshmem is None:  # pragma: no cover
        raise OSError("coremap's shared memory needs a POSIX system (Linux or macOS)")


@functools.cache
def namespace_tag() -> str:
    """A short tag of this process's boot and pid namespace (where its pids mean something).

    Processes that share /dev/shm but not a pid namespace (a container started
    with ``--ipc=host``) get different tags, so neither judges the other's
    segments by pid.
    """
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))  # "pid:[4026531836]"
    except OSError:  # no /proc (macOS): no pid namespaces either
        pass
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=5).digest()
    return base64.b32encode(digest).decode().lower()[:TAG_CHARS]


def _random_part() -> str:
    return base64.b32encode(secrets.token_bytes(6)).decode().lower()[:RANDOM_CHARS]


def new_name() -> str:
    """A fresh segment name for this process (see the module docstring)."""
    name = f"{PREFIX}{os.getpid()}_{namespace_tag()}_{_random_part()}"
    assert len(name) <= NAME_MAX, name  # pids have at most 7 digits (pid_max <= 2**22)
    return name


def parse_name(name: str) -> tuple[int, str] | None:
    """``(creator pid, namespace tag)`` of a coremap segment name, or None."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX):].split("_")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[1]) != TAG_CHARS:
        return None
    return int(parts[0]), parts[1]


def creator_pid(name: str) -> int | None:
    """The pid of the process that created segment ``name`` (None if not a coremap name)."""
    parsed = parse_name(name)
    return None if parsed is None else parsed[0]


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
            name = new_name()
            try:
                fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                continue  # taken (or planted): never attach to it, pick another name
            if _hold(fd):
                break
            os.close(fd)  # a cleaner took it before we locked it: take another name
            try:
                _posixshmem.shm_unlink("/" + name)
            except FileNotFoundError:
                pass
        else:  # pragma: no cover - 16 collisions of 45 random bits
            raise FileExistsError("could not find a free shared-memory name")
        try:
            os.fchmod(fd, 0o600)
            _reserve(fd, total)
            mm = mmap.mmap(fd, total)  # dups fd: the mapping keeps the lock
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
        # Typed as an open mapping for its readers: a closed segment's arrays and
        # views are never made again (the pool and SharedArray drop it first).
        self.mmap = None  # type: ignore[assignment]

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


def _hold(fd: int) -> bool:
    """Take the owner's shared lock on a new segment; False if a cleaner got there first.

    Never blocks: a cleaner holding the lock is about to unlink the name (it took
    our pid for dead), so the caller drops this one and takes another name.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # pragma: no cover - a filesystem without flock: pid checks only
        return True
    return os.fstat(fd).st_nlink > 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's live process
    return True


def list_segments() -> list[str]:
    """Names of the coremap segments in /dev/shm."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:  # pragma: no cover - no /dev/shm (macOS)
        return []


def _remove_if_unheld(name: str) -> bool:
    """Unlink ``name`` if nobody holds its lock; False if held or not removable.

    Opened with ``O_NONBLOCK | O_NOFOLLOW`` so a planted FIFO or symlink neither
    blocks nor redirects us; the lock is taken on the very file the name holds.
    """
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # another user's (PermissionError), gone, a symlink: not ours to clean
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner (or a forked child of it) holds it: alive
        except OSError:  # pragma: no cover - no flock here: the pid check decided
            pass
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False  # the name was replaced meanwhile
        os.unlink(path)
        return True
    except OSError:  # PermissionError (sticky /dev/shm), FileNotFoundError: skip it
        return False
    finally:
        os.close(fd)


def clean(creators: Collection[int] | None = None, exiting: bool = False,
          dead: Collection[int] = ()) -> list[str]:
    """Remove the stale segments of this namespace (of ``creators`` only, if given).

    ``exiting``: this process is about to exit without running finalizers (a
    worker whose parent died): its own names go too, held or not. ``dead``: pids
    known to have exited although ``kill(pid, 0)`` still finds them (a worker's
    parent, SIGKILLed and not yet reaped: a zombie); their segments go unless
    held (by a forked child of theirs).
    """
    removed = []
    tag = namespace_tag()
    me = os.getpid()
    for name in list_segments():
        parsed = parse_name(name)
        if parsed is None or parsed[1] != tag:
            continue  # an older format, or another namespace: its pid means nothing here
        pid = parsed[0]
        if creators is not None and pid not in creators:
            continue
        if exiting and pid == me:
            try:
                _posixshmem.shm_unlink("/" + name)
                removed.append(name)
            except OSError:
                pass
            continue
        if pid not in dead and _pid_alive(pid):
            continue
        if _remove_if_unheld(name):
            removed.append(name)
    return removed


def cleanup_stale() -> list[str]:
    """Remove segments left behind by dead processes; return their names.

    Only segments created in this boot and pid namespace are judged (their
    creator pid is in the name, and means something here), and of those only
    the ones whose creator is dead and whose lock nobody holds. Live owners'
    segments are never touched, whoever and wherever they are; segments that
    cannot be removed (another user's) are skipped. Segments named by coremap
    versions before the boot and namespace tag (``coremap_<pid>_<hex>``) carry no
    such proof and are not judged: remove any left from them by hand.

    Examples
    --------
    >>> import coremap as cm
    >>> removed = cm.cleanup_stale()
    """
    return clean()


# -- arrays in segments ----------------------------------------------------------------
# Below the front end's SharedArray (shared.py), so that the engines can hand out
# and recognise arrays in segments without importing the front end. SharedArray is
# a subclass: everything here holds for it too.

def inside(arr: np.ndarray, seg: Segment) -> bool:
    """True if every element of ``arr`` lies within ``seg``'s mapping."""
    start = arr.__array_interface__["data"][0]
    if arr.size == 0:
        return seg.address <= start <= seg.address + seg.size
    lo = hi = start
    for n, s in zip(arr.shape, arr.strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return seg.address <= lo and hi + arr.itemsize <= seg.address + seg.size


class SegmentArray(np.ndarray):
    """An ndarray whose elements live in a segment (``_segment``; None for a view
    that leaves it). The process engine's pooled operands are these."""

    _segment: Segment | None = None

    def __array_finalize__(self, obj: object) -> None:
        seg = getattr(obj, "_segment", None)
        if seg is not None and not inside(self, seg):
            seg = None
        self._segment = seg


_A = TypeVar("_A", bound=SegmentArray)


@overload
def array_in(
    seg: Segment, shape: tuple[int, ...], dtype: DTypeLike, order: Order = ...
) -> SegmentArray: ...
@overload
def array_in(
    seg: Segment, shape: tuple[int, ...], dtype: DTypeLike, order: Order, cls: type[_A]
) -> _A: ...
def array_in(
    seg: Segment,
    shape: tuple[int, ...],
    dtype: DTypeLike,
    order: Order = "C",
    cls: type[SegmentArray] = SegmentArray,
) -> SegmentArray:
    """A new ``cls`` array over ``seg``'s data (after the header)."""
    arr = np.ndarray(shape, dtype, buffer=seg.mmap, offset=HEADER, order=order).view(cls)
    arr._segment = seg
    return arr


def segment_of(view: np.ndarray, origin: object = None) -> Segment | None:
    """The segment holding all of ``view``'s elements, or None.

    ``origin`` is the array ``view`` was derived from (an input as given), for views
    whose ``.base`` chain no longer leads to the array in the segment:
    ``np.broadcast_to``'s, and ``np.asarray``'s of a whole SharedArray (NumPy
    collapses the chain past it).
    """
    for start in (view, origin):
        base = start
        while isinstance(base, np.ndarray):
            if isinstance(base, SegmentArray) and base._segment is not None:
                return base._segment if inside(view, base._segment) else None
            base = base.base
    return None
