"""The user's memory limit: how much memory the heavy steps (ingest, build, train, score) may use.

``--memory-limit 4GB`` on those commands, or ``PURCHASE_INTENT_MEMORY_LIMIT=4GB``, sets it. It is:

- DuckDB's ``memory_limit`` on every workspace connection (``Workspace.connect``); past it DuckDB
  spills to ``<workspace>/.tmp-duckdb-<id>/`` (one per connection, removed when it closes), so the feature SQL
  over a log larger than memory still runs;
- the size of the record batches the steps stream (``batch_rows``): a batch is at most 1/16 of the
  limit, so batches plus DuckDB's share stay under it.

In an encrypted workspace (``storage.active()``) DuckDB does not spill at all unless a spill folder
is named (``--spill-dir DIR`` or ``$PURCHASE_INTENT_SPILL_DIR``): its spill files are plaintext (this
DuckDB cannot encrypt them), so by default nothing about a shopper reaches the disk unencrypted, and a
query that outgrows memory ends with one line that says to raise the limit or name a folder on an
encrypted volume. Ingest's spills, which hold raw ids, follow the same rule.

Without a limit DuckDB keeps its own default (80% of the machine's memory) and batches are sized
for 2 GB. A limit too small to run a step at all ends it with :class:`MemoryLimitError`, one line
naming the limit and the step. The limit bounds what DuckDB and the batches hold; what a model
library allocates (LightGBM's binned dataset, torch's tensors) comes on top (BENCHMARKS.md
measures the peak of every step).
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

import duckdb

from . import storage

MEMORY_LIMIT_ENV = "PURCHASE_INTENT_MEMORY_LIMIT"
# where an encrypted workspace's DuckDB may spill (plaintext): a folder the user trusts, e.g. on an encrypted volume
SPILL_DIR_ENV = "PURCHASE_INTENT_SPILL_DIR"
MIN_LIMIT = 64 * 2 ** 20  # below this DuckDB cannot even plan the feature SQL
DEFAULT_BATCH_BUDGET = 2 * 2 ** 30  # bytes batches are sized for when no limit is set
# under the workspace root, one folder per connection (DuckDB's temp file names are not unique per
# instance, and DuckDB removes the folder it created when the connection closes); it starts with the
# workspace's TMP_PREFIX, so a crash's leftover is removed by the next command and `forget` /
# `rotate-key` never copy it
TMP_DIR_PREFIX = ".tmp-duckdb-"

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "TB": 1000 ** 4,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class MemoryLimitError(ValueError):
    """A bad memory limit, or one too small for a step (the message names both)."""


def parse_size(text: str) -> int:
    """Bytes of a size such as ``4GB``, ``512MB``, ``1.5GiB`` (decimal units as DuckDB reads them).

    Raises MemoryLimitError for anything else or for a limit below 64 MB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise MemoryLimitError(f"memory limit {text!r} is not a size: write it like 4GB, 512MB or 1.5GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < MIN_LIMIT:
        raise MemoryLimitError(f"memory limit {text!r} is below the minimum of 64MiB (67MB): no step can run in it")
    return n


def limit_text() -> str | None:
    """The limit as the user wrote it (``$PURCHASE_INTENT_MEMORY_LIMIT``), or None."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    return text or None


def limit_bytes() -> int | None:
    """The limit in bytes, or None when none is set (raises MemoryLimitError for a bad one)."""
    text = limit_text()
    return parse_size(text) if text else None


def duckdb_bytes() -> int:
    """What DuckDB may hold: the limit, or DuckDB's own default without one (80% of the machine's memory)."""
    n = limit_bytes()
    return n if n is not None else int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def set_limit(text: str | None) -> None:
    """Set the limit for this process and those it starts (``--memory-limit``); None keeps the env's."""
    if text is not None:
        parse_size(text)
        os.environ[MEMORY_LIMIT_ENV] = text.strip()


def set_spill_dir(path: str | None) -> None:
    """Name the folder an encrypted workspace's DuckDB may spill to (``--spill-dir``); None keeps the env's."""
    if path is not None:
        if not Path(path).is_dir():
            raise MemoryLimitError(f"--spill-dir {path}: no such folder; create it (on an encrypted volume) first")
        os.environ[SPILL_DIR_ENV] = str(Path(path).resolve())


def spill_dir() -> Path | None:
    """The spill folder the user named for encrypted workspaces, or None."""
    text = os.environ.get(SPILL_DIR_ENV, "").strip()
    return Path(text) if text else None


def plaintext_spill_refused() -> bool:
    """Whether DuckDB may not spill here: the workspace is encrypted and no spill folder is named."""
    return storage.active() and spill_dir() is None


def batch_rows(bytes_per_row: int, lo: int = 1_024, hi: int = 4_000_000) -> int:
    """Rows per streamed batch of rows of ``bytes_per_row``: 1/16 of the limit, within [lo, hi]."""
    budget = limit_bytes() or DEFAULT_BATCH_BUDGET
    return int(min(hi, max(lo, budget // 16 // max(1, bytes_per_row))))


def configure(con, root: Path | None = None) -> None:
    """Apply the limit to DuckDB connection ``con``: ``memory_limit`` and spilling under ``root``.

    In an encrypted workspace spilling goes to the named spill folder, or is turned off (see the
    module's docstring), whatever ``root`` or the caller set before."""
    n = limit_bytes()
    if n is not None:
        con.execute(f"SET memory_limit = '{n // 2 ** 20}MiB'")
    if storage.active():
        root = spill_dir()
        if root is None:
            con.execute("SET temp_directory = ''")
            return
    if root is not None and Path(root).is_dir():
        tmp = Path(root) / f"{TMP_DIR_PREFIX}{uuid.uuid4().hex[:12]}"
        con.execute("SET temp_directory = '" + str(tmp).replace("'", "''") + "'")


def _out_of_memory(e: BaseException | None) -> BaseException | None:
    """The out-of-memory error ``e`` is, or was raised from (a step may wrap DuckDB's), or None."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (MemoryError, duckdb.OutOfMemoryException)) or (
                isinstance(e, duckdb.Error) and "out of memory" in str(e).lower()):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Run step ``name``; running out of memory ends it with one line naming the limit and the step."""
    try:
        yield
    except Exception as err:
        e = _out_of_memory(err)
        if e is None:
            raise
        text = limit_text()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if plaintext_spill_refused():
            limit = f"the limit {text}" if text else "DuckDB may use"
            raise MemoryLimitError(f"step {name} needs more memory than {limit} "
                                   f"({first[:200]}), and an encrypted workspace does not spill plaintext to disk: "
                                   f"raise --memory-limit, or name a folder on an encrypted volume with --spill-dir "
                                   f"DIR (or ${SPILL_DIR_ENV})") from None
        if text:
            raise MemoryLimitError(f"memory limit {text} is too small for step {name} ({first[:200]}); raise "
                                   f"--memory-limit or ${MEMORY_LIMIT_ENV}") from None
        raise MemoryLimitError(f"step {name} ran out of memory ({first[:200]}); set a memory limit with "
                               f"--memory-limit (e.g. 4GB) so that DuckDB spills to disk") from None
