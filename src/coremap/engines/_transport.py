"""Objects with large arrays, pickled for another process with the arrays in shared memory.

    sender:   obj ──pickle_payload()──> Payload(data, large buffers, out of band)
              Payload ──stage()──> (info: segment name and offsets, the segment)
                      (no segment can be made: the buffers go in band, through the pipe)
    receiver: loads_shared(data, info) ──> obj, its arrays views of the segment

Pickle protocol 5 hands every contiguous array buffer to ``buffer_callback``;
the large ones are kept out of band and copied into one segment when the
object is sent, the receiver passes views of that segment as ``buffers=`` to
``pickle.loads``, and NumPy rebuilds the arrays on them: zero copy on the
receiving side, no Python walk over the arguments, arrays found at any depth.

Both sides of ``coremap.Pool`` use it: the parent for task arguments
(``coremap.pool``), the worker for results (``engines/_worker.py``). The
threshold ("large") is the caller's: the Pool's ``SHARE_BYTES`` travels in
each ``TaskSpec``.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined] # not in typeshed
from typing import Any, NamedTuple

from coremap import _shm

__all__ = ["Payload", "pickle_payload", "stage", "loads_shared", "export_results",
           "encoding_error"]

ALIGN = 64  # each buffer starts on a cache line of its segment


class Payload(NamedTuple):
    """An object pickled with its large buffers left out of band (still the owner's memory)."""

    data: bytes
    buffers: list


def pickle_payload(obj: Any, threshold: int, by_value: bool = True) -> Payload:
    """Pickle ``obj``: by reference (stdlib pickle) when the workers can import what it
    names, else by value (cloudpickle) when ``by_value``; buffers of at least
    ``threshold`` bytes out of band."""
    big: list = []

    def take(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes >= threshold:
            big.append(raw)
            return False  # out of band: staged into shared memory when sent
        return True

    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=take)
        # __main__ is the one module a worker cannot import (it runs ``python -c``)
        if not by_value or b"__main__" not in data:
            return Payload(data, big)
    except Exception:
        if not by_value:
            raise
    import cloudpickle  # lambdas, closures, __main__ and other by-value objects

    big.clear()
    return Payload(cloudpickle.dumps(obj, protocol=5, buffer_callback=take), big)


def stage(payload: Payload, on_short: Callable[[OSError], None] | None = None,
          ) -> tuple[Any, _shm.Segment | None, list | None]:
    """``(shared info, segment, in-band buffers)``: the large buffers copied into one
    segment, or handed back for the pipe when no segment can be made (after calling
    ``on_short`` with the reason)."""
    if not payload.buffers:
        return None, None, None
    offsets, total = [], 0
    for raw in payload.buffers:
        offsets.append((total, raw.nbytes))
        total += -(-raw.nbytes // ALIGN) * ALIGN
    try:
        seg = _shm.Segment.create(total)
    except OSError as exc:  # /dev/shm full (ENOSPC), missing, or not ours to use
        if on_short is not None:
            on_short(exc)
        return None, None, [pickle.PickleBuffer(raw) for raw in payload.buffers]
    view = memoryview(seg.mmap)
    for raw, (off, n) in zip(payload.buffers, offsets):
        view[_shm.HEADER + off:_shm.HEADER + off + n] = raw.cast("B")
    del view
    return (seg.name, offsets), seg, None


def loads_shared(data: bytes, info: Any, unlink: bool = False,
                 buffers: list | None = None) -> Any:
    """Unpickle what was staged: ``info`` names the segment holding the large buffers
    (``unlink`` removes its name once mapped); ``buffers`` came through the pipe."""
    if buffers is not None:
        return pickle.loads(data, buffers=buffers)
    if info is None:
        return pickle.loads(data)
    name, offsets = info
    seg = _shm.Segment.attach(name)
    if unlink:
        try:
            _shm._posixshmem.shm_unlink("/" + name)  # the mapping keeps the memory
        except FileNotFoundError:
            pass
    view = memoryview(seg.mmap)
    bufs = [view[_shm.HEADER + off:_shm.HEADER + off + n] for off, n in offsets]
    return pickle.loads(data, buffers=bufs)


def export_results(results: Any, threshold: int) -> tuple[bytes, Any]:
    """A worker's reply payload ``(data, info)``: results pickled, large arrays left in
    a segment that the parent adopts (maps, then unlinks); in-band when no segment
    can be made."""
    payload = pickle_payload(results, threshold, by_value=False)
    info, seg, inband = stage(payload)
    if inband is not None:
        return pickle.dumps(results, protocol=5), None
    if seg is not None and seg._finalizer is not None:
        seg._finalizer.detach()  # the parent unlinks it once mapped
    return payload.data, info


def encoding_error(exc: BaseException, results: Any) -> MaybeEncodingError:
    """What a worker reports for results it cannot pickle (as ``multiprocessing``)."""
    return MaybeEncodingError(exc, results)
