"""The embedded store: a directory of Parquet parts plus a manifest, queried through DuckDB.

Layout of a workspace (default ``./pi-workspace``, or ``$PURCHASE_INTENT_WORKSPACE``)::

    events/manifest.json     the ingested source files (sha256, parts, counts); the commit point
    events/part-*.parquet    canonical events, one part per ingested source file
    rejects/*.csv            rejected rows: source_file, line, reason, raw
    pseudonym.key            the pseudonymisation key (unless $PURCHASE_INTENT_PSEUDONYM_KEY is set)
    examples/                built examples and features
    runs/<name>/             one directory per trained model

Every write is atomic: a file or directory is built under a temporary name
(``.tmp-<pid>-<random>-<name>`` in the same directory) and renamed into place when complete.
Temporary entries left by a killed process are ignored and removed on the next use of the
workspace; so are part and reject files that no manifest lists (a commit that never happened).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import duckdb

WORKSPACE_ENV = "PURCHASE_INTENT_WORKSPACE"
DEFAULT_WORKSPACE = "pi-workspace"
TMP_PREFIX = ".tmp-"


def default_root() -> Path:
    """The workspace folder: ``$PURCHASE_INTENT_WORKSPACE`` or ``./pi-workspace``."""
    return Path(os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


# --- atomic writes -------------------------------------------------------------------------


def tmp_path(path: str | Path) -> Path:
    """A fresh temporary name next to ``path`` (same directory, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory entry change (a rename) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is left untouched. An
    existing ``path`` is replaced (the old one is moved aside, then deleted).

    Examples
    --------
    >>> with atomic_dir(ws.run_dir("lightgbm")) as d:   # doctest: +SKIP
    ...     (d / "config.json").write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = tmp_path(path)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_tmp(directory: str | Path) -> list[Path]:
    """Remove temporary entries in ``directory`` whose writing process is gone."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            pid = int(entry.name[len(TMP_PREFIX):].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid > 0 and pid != os.getpid() and _pid_alive(pid):
            continue
        if pid == os.getpid():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# --- the workspace -------------------------------------------------------------------------


class NothingIngestedError(RuntimeError):
    """The workspace holds no events yet."""


class Workspace:
    """A workspace directory: events (Parquet parts + manifest), rejects, key, examples, runs.

    Parameters
    ----------
    root : str or Path, optional
        The folder; default ``$PURCHASE_INTENT_WORKSPACE`` or ``./pi-workspace``. It is created
        on first write, not on construction.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # paths
    @property
    def events_dir(self) -> Path:
        return self.root / "events"

    @property
    def manifest_path(self) -> Path:
        return self.events_dir / "manifest.json"

    @property
    def rejects_dir(self) -> Path:
        return self.root / "rejects"

    @property
    def key_path(self) -> Path:
        return self.root / "pseudonym.key"

    @property
    def examples_dir(self) -> Path:
        return self.root / "examples"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str | Path) -> Path:
        """A run directory: ``name`` under ``runs/``, or ``name`` itself when it is a path to a
        directory (absolute, containing a separator, or existing)."""
        p = Path(name)
        if p.is_absolute() or len(p.parts) > 1 or (p.is_dir() and not (self.runs_dir / p).exists()):
            return p
        return self.runs_dir / p

    # manifest
    def read_manifest(self) -> dict:
        """The manifest: ``{"version": 1, "key_id": ..., "files": [entry, ...]}`` (empty if none)."""
        if not self.manifest_path.exists():
            return {"version": 1, "key_id": None, "files": []}
        return json.loads(self.manifest_path.read_text())

    def part_paths(self) -> list[Path]:
        """The Parquet parts listed in the manifest, in ingestion order."""
        return [self.events_dir / p for e in self.read_manifest()["files"] for p in e["parts"]]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for writers of the events store (one ingest at a time)."""
        self.events_dir.mkdir(parents=True, exist_ok=True)
        with open(self.events_dir / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def recover(self) -> list[Path]:
        """Remove what an interrupted write left behind: temporary entries of dead processes, and
        part/reject files no manifest lists. Call with :meth:`lock` held. Returns removed paths."""
        removed: list[Path] = []
        for d in (self.events_dir, self.rejects_dir, self.root, self.examples_dir, self.runs_dir):
            removed += clean_tmp(d)
        manifest = self.read_manifest()
        parts = {p for e in manifest["files"] for p in e["parts"]}
        rejects = {Path(e["rejects"]).name for e in manifest["files"] if e.get("rejects")}
        if self.events_dir.is_dir():
            for f in self.events_dir.glob("part-*.parquet"):
                if f.name not in parts:
                    f.unlink()
                    removed.append(f)
        if self.rejects_dir.is_dir():
            for f in self.rejects_dir.glob("*.csv"):
                if f.name not in rejects:
                    f.unlink()
                    removed.append(f)
        return removed

    def connect(self, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with a view ``events`` over exactly the parts in the manifest.

        Raises
        ------
        NothingIngestedError
            When no events were ingested into this workspace yet.
        """
        parts = self.part_paths()
        if not parts:
            raise NothingIngestedError(
                f"no events in workspace {self.root}: run `purchase-intent ingest PATH --format F` first"
            )
        con = duckdb.connect(database)
        con.execute("SET TimeZone = 'UTC'")
        files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in parts)
        con.execute(f"CREATE OR REPLACE VIEW events AS SELECT * FROM read_parquet([{files}], union_by_name = true)")
        return con


def as_workspace(workspace: Workspace | str | Path | None) -> Workspace:
    """``workspace`` itself when it is a Workspace, else the workspace at that folder (None: the default)."""
    return workspace if isinstance(workspace, Workspace) else Workspace(workspace)
