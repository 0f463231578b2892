"""Keep freed heap memory in the process, so that large tensors reuse pages already mapped.

glibc's ``malloc`` serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a
fresh ``mmap`` and unmaps it again on ``free``; the next tensor of that size page-faults every page
back in, zero-filled by the kernel. A training step of the Transformer allocates and frees dozens
of such tensors (activations of (batch, length, width) floats: 13–52 MB each), so on CPU a
large part of a step went to page faults, not arithmetic. Measured on this project's machine
(``benchmarks/bench_transformer.py``, BENCHMARKS.md): GELU over a (256, 201, 256) tensor took 42
ms into fresh pages and 12 ms into reused ones.

:func:`retain_freed_memory` tells glibc to serve large allocations from the heap and never to give
the heap back (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``). The cost: the
process keeps its peak heap until it exits (for one Transformer fit, hundreds of MB). Training
(:func:`purchase_intent.train.train`) and batch inference
(:func:`purchase_intent.train.predict_logits`) call it; it acts once per process, only on glibc
Linux, and ``PURCHASE_INTENT_RETAIN_HEAP=0`` in the environment turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # free heap above this is given back (effectively: never, for our sizes)

_lock = threading.Lock()
_state: dict = {"done": False, "active": False}


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (once per process); True when it is in effect."""
    with _lock:
        if _state["done"]:
            return _state["active"]
        _state["done"] = True
        if os.environ.get("PURCHASE_INTENT_RETAIN_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt  # absent in musl: AttributeError
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _state["active"] = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
        return _state["active"]
