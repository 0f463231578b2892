"""The embedded store: a directory of Parquet parts plus a manifest, queried through DuckDB.

Layout of a workspace (default ``./pi-workspace``, or ``$PURCHASE_INTENT_WORKSPACE``)::

    events/manifest.json     the ingested source files (sha256, parts, counts); the commit point
    events/part-*.parquet    canonical events, one part per ingested source file
    rejects/*.csv            rejected rows: source_file, line, reason, raw
    pseudonym.key            the pseudonymisation key (unless $PURCHASE_INTENT_PSEUDONYM_KEY is set)
    encryption.json          only in an encrypted workspace: its key check value (see ``storage``)
    .lock                    who writes now: command, pid, start time (see ``Workspace.lock``)
    examples/                built examples and features
    runs/<name>/             one directory per trained model

Every write is atomic: a file or directory is built under a temporary name
(``.tmp-<pid>-<random>-<name>`` in the same directory) and renamed into place when complete.
Temporary entries left by a killed process are ignored and removed on the next use of the
workspace; so are part and reject files that no manifest lists (a commit that never happened),
and a whole second tree of the workspace beside it (``<parent>/.tmp-<pid>-<random>-<name>``,
what an interrupted ``forget`` leaves, see ``erasure.py``).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import duckdb

from . import memory, storage

WORKSPACE_ENV = "PURCHASE_INTENT_WORKSPACE"
DEFAULT_WORKSPACE = "pi-workspace"
TMP_PREFIX = ".tmp-"
RUN_JSON = "run.json"  # what makes a folder under runs/ a run (runs.py writes it)


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
    clean_tmp(path.parent, name=path.name)
    tmp = tmp_path(path)
    try:
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
    except OSError as e:
        raise _write_error(path, e) from e


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_tmp(path.parent, name=path.name)  # what a killed earlier write of the same path left
        tmp = tmp_path(path)
        tmp.mkdir()
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists() and _exchange(tmp, path):  # one atomic swap: the old directory is now at ``tmp``
            fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if path.exists():  # no atomic swap here: a kill between these two renames leaves no ``path``
            old = tmp_path(path)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two paths atomically (each name then holds what the other held); False where the kernel
    cannot (then nothing happened)."""
    return _exchange(Path(a), Path(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def link_tree(src: Path, dest: Path, changed: dict[str, Optional[Callable[[Path], None]]]) -> None:
    """Fill ``dest`` with ``src``'s tree: the files of ``changed`` (relative path -> a writer of the new
    content, None to leave the file out) rewritten or removed, the rest hard-linked."""
    os.chmod(dest, stat.S_IMODE(src.stat().st_mode))
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
        here = Path(dirpath)
        rel_dir = here.relative_to(src)
        for d in dirnames:
            target = dest / rel_dir / d
            if (here / d).is_symlink():
                os.symlink(os.readlink(here / d), target)
                continue
            target.mkdir()
            os.chmod(target, stat.S_IMODE((here / d).stat().st_mode))
        for name in filenames:
            if name.startswith(TMP_PREFIX):
                continue
            rel = str(rel_dir / name)
            s, t = here / name, dest / rel
            if rel in changed:
                write = changed[rel]
                if write is not None:
                    write(t)
                    os.chmod(t, stat.S_IMODE(s.stat().st_mode))
            elif s.is_symlink():
                os.symlink(os.readlink(s), t)
            else:
                try:
                    os.link(s, t)
                except OSError:  # a file system without hard links: a copy
                    shutil.copy2(s, t)


RESTORE_MARKER = TMP_PREFIX + "restore"  # in a snapshot tree: the lock record of the command it belongs to


@contextlib.contextmanager
def all_or_nothing(root: str | Path) -> Iterator[bool]:
    """Run a command of several writing steps (``retrain``: ingest, build, train) so that it changes
    the workspace at ``root`` all or nothing. Call with the workspace lock held; yields True when
    the guarantee holds.

    Before the steps, a snapshot of the workspace is made beside it as a tree of hard links
    (``<parent>/.tmp-<pid>-<random>-<name>``, no copy of the data: every write in the workspace
    replaces files rather than changing them in place, so a link keeps the old content). On success
    the snapshot is deleted (its marker first). On an exception (Ctrl-C included) the snapshot and
    the workspace are swapped in one ``renameat2(RENAME_EXCHANGE)`` and the changed tree is deleted,
    so the workspace is exactly as before. The snapshot's :data:`RESTORE_MARKER` holds the lock
    record of this command: if the process is killed (``kill -9``) before either end, the next
    writing command finds that record left in the lock file and its :meth:`Workspace.recover` swaps
    the snapshot back; a snapshot whose record is not the one left there is never restored. The lock
    file is a hard link too, so the lock stays held across the swap.

    Where the workspace is a mount point or its parent folder is on another file system or not
    writable, no snapshot can be made: the steps run without it (yields False) and a line on stderr
    says so.
    """
    root = Path(root).resolve()
    try:
        same_fs = root.stat().st_dev == root.parent.stat().st_dev and os.access(root.parent, os.W_OK)
    except OSError:
        same_fs = False
    if not same_fs:
        print(f"warning: {root} is a mount point or its parent folder is not writable on the same file system: "
              "this command is not all or nothing (a failure keeps what it changed before it)", file=sys.stderr)
        yield False
        return
    snapshot = tmp_path(root)
    try:
        snapshot.mkdir()
        link_tree(root, snapshot, {})
        record = (root / ".lock").read_bytes().strip() if (root / ".lock").is_file() else b""
        (snapshot / RESTORE_MARKER).write_bytes(record)
        fsync_dir(snapshot)
        fsync_dir(root.parent)
    except OSError as e:
        shutil.rmtree(snapshot, ignore_errors=True)
        raise _write_error(snapshot, e) from e
    try:
        yield True
    except BaseException:
        _restore(snapshot, root)
        raise
    _discard(snapshot)


def _discard(tree: Path) -> None:
    """Delete a snapshot tree, its marker first: a tree cut short by a kill is never restored."""
    (tree / RESTORE_MARKER).unlink(missing_ok=True)
    fsync_dir(tree)
    shutil.rmtree(tree, ignore_errors=True)


def _restore(snapshot: Path, root: Path) -> None:
    """Put the snapshot tree back at ``root``; the changed tree is deleted."""
    if not _exchange(snapshot, root):  # no atomic swap here: two renames
        failed = tmp_path(root)
        os.replace(root, failed)
        os.replace(snapshot, root)
        snapshot = failed
    fsync_dir(root.parent)
    (root / RESTORE_MARKER).unlink(missing_ok=True)
    fsync_dir(root)
    _discard(snapshot)


class WorkspaceWriteError(RuntimeError):
    """The disk refused a write (full, a file size limit, read-only, no permission); nothing was replaced."""


# errors of the storage itself, as opposed to a path that is not there
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _write_error(path: Path, e: OSError) -> Exception:
    if e.errno not in _STORAGE_ERRNOS:
        return e
    return WorkspaceWriteError(f"cannot write {path}: {e.strerror or e}; what was stored there before is unchanged")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_pid(entry: Path) -> int:
    """The pid in a temporary name (``.tmp-<pid>-...``), -1 when there is none."""
    try:
        return int(entry.name[len(TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return -1


_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[0-9a-f]{8}-(.+)", re.S)  # what tmp_path makes


def _is_tmp_of(entry: Path, name: str) -> bool:
    """``entry`` is a temporary name that :func:`tmp_path` made for ``name`` (exactly: not for a
    sibling whose name ends with it)."""
    m = _TMP_NAME.fullmatch(entry.name)
    return m is not None and m.group(2) == name


def clean_tmp(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove temporary entries in ``directory`` whose writing process is gone (only those of the
    entry ``name`` when given)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or (name is not None and not _is_tmp_of(entry, name)):
            continue
        pid = _tmp_pid(entry)
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


class DamagedWorkspaceError(RuntimeError):
    """A stored file the manifest lists cannot be read."""


class WorkspaceBusy(RuntimeError):
    """Another command holds the workspace lock."""


# lock paths this process holds: resolved path -> (thread id, command)
_HELD: dict[str, tuple[int, str]] = {}
_HELD_GUARD = threading.Lock()


def _parse_record(data: bytes) -> dict | None:
    try:
        rec = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _open_lock_file(root: Path, path: Path) -> int | None:
    """The lock file's descriptor, or None when the workspace cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and root.is_dir():
            return None
        raise RuntimeError(f"cannot use workspace {root}: {e.strerror}") from e


def _busy_message(data: bytes, root: Path) -> str:
    rec = _parse_record(data) or {}
    since = ""
    if isinstance(rec.get("started"), (int, float)):
        since = " since " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec["started"]))
    pid = f" (pid {rec['pid']})" if isinstance(rec.get("pid"), int) else ""
    return (f"another {rec.get('command') or 'command'} is running on workspace {root}{since}{pid}; "
            "wait for it to finish")


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
    def lock(self, command: str) -> Iterator[None]:
        """Hold the workspace for one writing command; a second one fails at once with :class:`WorkspaceBusy`.

        The lock is an OS lock (``flock``) on ``<workspace>/.lock``, which also holds a record of the
        holder (command, pid, start time) for the message of the one that waits. The kernel releases
        the lock when its process dies, so a record left by a killed command never blocks: the next
        command takes the lock and first removes what the killed one left half-written
        (:meth:`recover`). Nested use in one process (``run`` calling ``ingest``) is allowed. A
        read-only workspace is not locked (nothing can be written to it).

        Examples
        --------
        >>> with Workspace("pi-workspace").lock("ingest"):   # doctest: +SKIP
        ...     ingest(...)
        """
        path = self.root / ".lock"
        key = str(path.resolve())
        with _HELD_GUARD:
            held = _HELD.get(key)
        if held is not None:  # this process holds it already
            if held[0] != threading.get_ident():
                raise WorkspaceBusy(f"another {held[1]} is running on this workspace (pid {os.getpid()}); "
                                    "wait for it to finish")
            yield
            return
        fd = _open_lock_file(self.root, path)
        if fd is None:  # a read-only workspace: readers go on; a writer fails at its first write
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceBusy(_busy_message(os.pread(fd, 4096, 0), self.root)) from None
            stale = os.pread(fd, 4096, 0).strip()  # a record of a holder that died without releasing
            record = json.dumps(dict(command=command, pid=os.getpid(), started=time.time())).encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except OSError:
                pass  # the record is for messages only; the flock is the lock
            with _HELD_GUARD:
                _HELD[key] = (threading.get_ident(), command)
            try:
                # a missing or wrong key: nothing is written; a key for a new workspace: it is marked encrypted
                if storage.check_workspace(self.root) and not storage.is_encrypted_workspace(self.root):
                    atomic_write_json(self.root / storage.MARKER, storage.new_marker())
                if stale:
                    self.recover(stale)
                yield
            finally:
                with _HELD_GUARD:
                    _HELD.pop(key, None)
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def lock_holder(self) -> dict | None:
        """The record of the command holding the lock now (command, pid, started), or None."""
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _parse_record(os.pread(fd, 4096, 0)) or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def recover(self, stale_record: bytes = b"") -> list[Path]:
        """Remove what an interrupted write left behind: temporary entries of dead processes, and
        part/reject files no manifest lists; first, the snapshot of a command killed inside
        :func:`all_or_nothing` whose lock record ``stale_record`` is (what :meth:`lock` found left
        in the lock file) is put back. Call with :meth:`lock` held. Returns removed paths."""
        removed: list[Path] = []
        removed += self._restore_snapshot(stale_record.strip())
        run_dirs = sorted(p for p in self.runs_dir.iterdir() if p.is_dir()) if self.runs_dir.is_dir() else []
        for d in (self.events_dir, self.rejects_dir, self.root, self.examples_dir, self.runs_dir, *run_dirs):
            removed += clean_tmp(d)  # run folders hold the scratch of an interrupted `score`
        root = self.root.resolve()
        with contextlib.suppress(OSError):  # the other tree of an interrupted whole-workspace swap (`forget`)
            removed += clean_tmp(root.parent, name=root.name)
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

    def _restore_snapshot(self, record: bytes) -> list[Path]:
        """Put back the snapshot (beside the workspace) whose marker holds lock record ``record``, the
        record of a holder that died; the marker of any other leftover snapshot is removed, so that
        it is deleted as a leftover, never restored. Returns the replaced tree."""
        root = self.root.resolve()
        if not root.parent.is_dir():
            return []
        for entry in sorted(root.parent.iterdir()):
            marker = entry / RESTORE_MARKER
            if not (_is_tmp_of(entry, root.name) and _tmp_pid(entry) != os.getpid() and marker.is_file()):
                continue
            if record and marker.read_bytes().strip() == record:
                _restore(entry, root)
                return [entry]
            if not _pid_alive(_tmp_pid(entry)):
                marker.unlink(missing_ok=True)
        return []

    def connect(self, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with a view ``events`` over exactly the parts in the manifest.

        Raises
        ------
        NothingIngestedError
            When no events were ingested into this workspace yet.
        """
        storage.check_workspace(self.root)
        parts = self.part_paths()
        if not parts:
            raise NothingIngestedError(
                f"no events in workspace {self.root}: run `purchase-intent ingest PATH --format F` first"
            )
        con = duckdb.connect(database)
        con.execute("SET TimeZone = 'UTC'")
        memory.configure(con, self.root)  # the user's memory limit; spills under the workspace
        try:
            storage.create_view(con, "events", parts, union_by_name=True, spills=memory.spill_dir() is not None,
                                memory_bytes=memory.duckdb_bytes())
        except (duckdb.Error, OSError) as e:
            con.close()
            raise DamagedWorkspaceError(self._damaged_part_message(parts, e)) from None
        return con

    def _damaged_part_message(self, parts: list[Path], e: Exception) -> str:
        sources = {p: entry.get("source", "?") for entry in self.read_manifest()["files"] for p in entry["parts"]}
        for p in parts:
            try:
                storage.read_metadata(p)
            except (OSError, ValueError) as err:
                why = "it is missing" if not p.exists() else f"it is damaged ({str(err).splitlines()[0]})"
                return (f"events part {p} cannot be read: {why}; restore it from a backup, or ingest its source "
                        f"{sources.get(p.name, '?')} into a new workspace")
        return f"the events of workspace {self.root} cannot be read: {str(e).strip().splitlines()[0]}"


def as_workspace(workspace: Workspace | str | Path | None) -> Workspace:
    """``workspace`` itself when it is a Workspace, else the workspace at that folder (None: the default)."""
    return workspace if isinstance(workspace, Workspace) else Workspace(workspace)
