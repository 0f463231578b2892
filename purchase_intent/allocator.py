"""Keep freed heap memory for reuse while a model trains or scores, so large tensors skip page faults.

glibc's ``malloc`` serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a
fresh ``mmap`` and unmaps it again on ``free``; the next tensor of that size page-faults every page
back in, zero-filled by the kernel. A training step of the Transformer allocates and frees dozens
of such tensors (activations of (batch, length, width) floats: 13–52 MB each), so on CPU a
large part of a step went to page faults, not arithmetic. Measured on this project's machine
(BENCHMARKS.md, "speed"): GELU over a (256, 201, 256) tensor took 42 ms into fresh pages and 12 ms
into reused ones.

Inside :func:`retained_heap` glibc serves large allocations from the heap and does not give freed
memory back (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``). On leaving the
outermost block it restores mmap for large allocations and returns free memory to the system
(``malloc_trim``): the retained memory lives as long as the training run or scoring call, not
the process. (Held forever, it could grow: ``posix_memalign`` requests a little more than the
block it freed, so one size allocated and freed between long-lived small objects never reuses its
own hole.) :func:`purchase_intent.train.train` and :func:`purchase_intent.train.predict_logits`
use it on CPU. It acts only on glibc Linux; ``PURCHASE_INTENT_RETAIN_HEAP=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from typing import Iterator, Optional

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_RETAIN_TRIM_THRESHOLD = 1 << 30  # free heap above this is given back: effectively never, for our sizes
_RESTORE_TRIM_THRESHOLD = 32 << 20  # afterwards: trim free heap above 32 MiB, as glibc's dynamic default ends up
_RESTORE_MMAP_MAX = 65536  # glibc's default number of mmapped chunks

_lock = threading.Lock()
_depth = 0  # retained_heap blocks open now


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library with ``mallopt`` and ``malloc_trim`` typed, or None where they are missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no mallopt / malloc_trim)
        return None
    return lib


def enabled() -> bool:
    """Whether :func:`retained_heap` acts here (glibc, not turned off by the environment)."""
    return os.environ.get("PURCHASE_INTENT_RETAIN_HEAP", "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def retained_heap() -> Iterator[bool]:
    """Keep freed memory for reuse inside the block (nested and concurrent blocks share one setting).

    Yields whether it is in effect.
    """
    global _depth
    active = enabled()
    if active:
        with _lock:
            if _depth == 0:
                _glibc().mallopt(_M_MMAP_MAX, 0)
                _glibc().mallopt(_M_TRIM_THRESHOLD, _RETAIN_TRIM_THRESHOLD)
            _depth += 1
    try:
        yield active
    finally:
        if active:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _glibc().mallopt(_M_MMAP_MAX, _RESTORE_MMAP_MAX)
                    _glibc().mallopt(_M_TRIM_THRESHOLD, _RESTORE_TRIM_THRESHOLD)
                    _glibc().malloc_trim(0)
