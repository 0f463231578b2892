"""Sequence shards: a train split's model inputs as Parquet files, streamed one shard at a time.

The Transformer's train inputs (token fields and ``mask`` (N, T), ``tabular`` (N, F), ``label``
(N,)) are written once as shards of at most ``shard_rows`` examples, each a Parquet file written
through :mod:`~purchase_intent.storage` (encrypted in an encrypted workspace), with one
fixed-size list column per 2-D array. Shard ``i`` belongs to rank ``i % world_size``: a rank
writes, reads and removes only its own shards, so under ``torchrun`` no rank builds or holds the
whole train split, and ranks need no shared file system::

    with write_shards(folder, n_rows, shard_rows, make_inputs, seed=0) as shards:   # this rank's
        for data, idx, global_n in ShardStream(shards, batch_size=512, seed=0): ...

Decisions:

- Shards are a seeded random partition of the train rows (not contiguous ranges: rows come in
  ``example_id`` order, i.e. grouped by cutoff), so every shard is a sample of every cutoff and a
  buffer of one shard is enough to shuffle.
- Their number is a multiple of ``world_size`` and their sizes differ by at most one row, so the
  ranks hold equal shares (±1 row per shard).
- Per epoch a rank reads its shards in an order shuffled by ``(seed, epoch, rank)`` and shuffles
  the rows of each shard plus the rows left from the one before (fewer than one local batch):
  at most one shard and one batch are held, two shards for a moment while the next is read.
- Every rank takes the same number of steps per epoch: the fewest any rank's rows fill
  (``min over ranks of ceil(rows / local batch)``); the last step of a rank holds what is left,
  and a rank's rows past that step are dropped for the epoch (none at world 1; at most a few rows
  otherwise, since the shares are equal). A global batch of ``batch_size`` is split across the
  ranks as :class:`~purchase_intent.distributed.ShardedBatches` does.
- The shards live in a temporary folder (``.tmp-<pid>-...``: what a killed process left is
  removed by the workspace's recovery) and are removed when the context exits, on success or
  failure: they are a copy of shopper data that erasure need not chase.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from . import distributed, storage

SHARD_NAME = "shard-{:05d}.parquet"


def check_shard_rows(value) -> int:
    """``value`` as a number of rows per shard; ValueError (one line) unless a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"stream_shard_rows must be a positive integer (examples per train shard), got {value!r}: "
                         "give e.g. --param stream_shard_rows=50000, or stream_shard_rows=null to keep the "
                         "train split in memory")
    return int(value)


def plan(n_rows: int, shard_rows: int, world_size: int = 1) -> list[int]:
    """Rows of each shard: ``ceil(n_rows / shard_rows)`` shards rounded up to a multiple of
    ``world_size``, sizes differing by at most one."""
    shard_rows = check_shard_rows(shard_rows)
    if n_rows < world_size:
        raise ValueError(f"{n_rows} train examples cannot be shared among {world_size} ranks")
    n_shards = -(-n_rows // shard_rows)
    n_shards = -(-n_shards // world_size) * world_size
    return [len(a) for a in np.array_split(np.arange(n_rows), n_shards)]


@dataclass(frozen=True)
class SequenceShards:
    """The shards of one train split, as seen by one rank: every shard's size, its own files."""

    directory: Path
    rows: tuple[int, ...]  # rows of every shard, all ranks
    paths: dict  # shard number -> path, this rank's shards only
    rank: int = 0
    world_size: int = 1

    def own(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i % self.world_size == self.rank]

    def rank_rows(self, rank: int) -> int:
        return sum(r for i, r in enumerate(self.rows) if i % self.world_size == rank)

    @property
    def n_rows(self) -> int:
        """Train examples in all shards (all ranks)."""
        return sum(self.rows)

    def schema(self) -> dict[str, tuple]:
        """Column name -> shape of one row (``()`` or ``(T,)``), from this rank's first shard."""
        out = {}
        for f in storage.read_schema(self.paths[self.own()[0]]):
            out[f.name] = (f.type.list_size,) if pa.types.is_fixed_size_list(f.type) else ()
        return out


def to_table(data: dict[str, np.ndarray]) -> pa.Table:
    """A dict of (N,) / (N, T) arrays as a table: 2-D arrays as fixed-size list columns."""
    cols = {}
    for k, a in data.items():
        a = np.asarray(a)
        if a.ndim == 2:
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).ravel()), a.shape[1])
        else:
            cols[k] = pa.array(a)
    return pa.table(cols)


def from_table(table: pa.Table) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_table`."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """One shard's arrays (decrypted when encrypted)."""
    return from_table(storage.read_table(path))


@contextlib.contextmanager
def write_shards(parent: str | Path, n_rows: int, shard_rows: int,
                 make_inputs: Callable[[np.ndarray], dict[str, np.ndarray]], seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None) -> Iterator[SequenceShards]:
    """Write this rank's shards into a temporary folder under ``parent``; remove it on exit.

    Parameters
    ----------
    parent : path
        Where the temporary folder goes (a workspace's ``runs/``).
    n_rows, shard_rows : int
        Train examples in all, most examples per shard.
    make_inputs : callable
        ``make_inputs(positions) -> dict of arrays`` for train rows ``positions`` (0..n_rows-1), in
        that order; ``"label"`` included.
    seed : int
        Seeds the partition of the rows into shards.
    rank, world_size : int, optional
        Default: this process's (``distributed.dist_info()``).
    """
    info = distributed.dist_info()
    rank = info.rank if rank is None else rank
    world_size = info.world_size if world_size is None else world_size
    rows = plan(n_rows, shard_rows, world_size)
    order = np.random.default_rng([seed, 0x5A4D]).permutation(n_rows)
    bounds = np.concatenate([[0], np.cumsum(rows)])
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    directory = parent / f".tmp-{os.getpid()}-{os.urandom(4).hex()}-train-shards-rank{rank}"
    directory.mkdir()
    try:
        paths = {}
        for i in range(len(rows)):
            if i % world_size != rank:
                continue
            positions = np.sort(order[bounds[i]: bounds[i + 1]])  # sorted: the builder reads in order
            paths[i] = directory / SHARD_NAME.format(i)
            storage.write_parquet(to_table(make_inputs(positions)), paths[i])
        yield SequenceShards(directory, tuple(rows), paths, rank, world_size)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class ShardStream:
    """Per-epoch local batches from this rank's shards (the ``train_data`` of :func:`~purchase_intent.train.train`).

    Iterating yields ``(data, idx, global_n)``: a dict of arrays (the buffer), the rows of it that
    make this rank's batch, and the size of the global batch of the step. ``transform`` maps a
    shard's arrays to the model's (the classifier's standardisation), once per shard read.
    ``peak_rows`` is the most rows the buffer held.
    """

    def __init__(self, shards: SequenceShards, batch_size: int, seed: int = 0,
                 transform: Optional[Callable[[dict], dict]] = None):
        W = shards.world_size
        if batch_size < W:
            raise ValueError(f"a global batch of {batch_size} cannot be split among {W} ranks")
        self.shards, self.seed, self.epoch = shards, seed, 0
        self.transform = transform or (lambda d: d)
        self.local = [len(a) for a in np.array_split(np.arange(batch_size), W)]  # local batch of each rank
        self.rank_rows = [shards.rank_rows(r) for r in range(W)]
        self.steps = min(-(-n // b) for n, b in zip(self.rank_rows, self.local))
        self.peak_rows = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def _size(self, rank: int, step: int) -> int:
        return min(self.local[rank], self.rank_rows[rank] - step * self.local[rank])

    def __iter__(self):
        s = self.shards
        rng = np.random.default_rng([self.seed, self.epoch, s.rank])
        queue = list(rng.permutation(s.own()))
        buf: dict[str, np.ndarray] = {}
        perm, cursor = np.zeros(0, dtype=np.int64), 0
        for step in range(self.steps):
            need = self._size(s.rank, step)
            while len(perm) - cursor < need:  # the rows left plus the next shard, shuffled
                new = self.transform(read_shard(s.paths[int(queue.pop(0))]))
                rest = perm[cursor:]
                buf = {k: np.concatenate([v[rest], new[k]]) for k, v in buf.items()} if len(rest) else new
                perm, cursor = rng.permutation(len(buf["label"])), 0
                self.peak_rows = max(self.peak_rows, len(perm))
            idx = perm[cursor: cursor + need]
            cursor += need
            yield buf, idx, sum(self._size(r, step) for r in range(s.world_size))
