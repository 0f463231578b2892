"""Which `purchase-intent serve` processes serve runs from a runs directory, so that `retrain` can
tell them to reload (SIGHUP, the server's hot swap) after it promotes a run.

Each server writes ``<runs dir>/.servers/<pid>.json`` (pid, run, host, port, start time) when it
starts and removes it when it stops; a record whose process is gone is ignored and removed.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from ..workspace import atomic_write_json

SERVERS_DIR = ".servers"


def register(runs_dir: str | Path, run: str, host: str, port: int) -> Path:
    """Record this process as a server of ``run`` from ``runs_dir``; returns the record's path."""
    path = Path(runs_dir) / SERVERS_DIR / f"{os.getpid()}.json"
    atomic_write_json(path, {"pid": os.getpid(), "run": run, "host": host, "port": port, "started": time.time()})
    return path


def unregister(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


def _is_server(pid: int) -> bool:
    """The process ``pid`` is alive and (where /proc tells) a `serve` command, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not ours to signal
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"serve" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def servers(runs_dir: str | Path) -> list[dict]:
    """Records of the live servers of ``runs_dir``; records of dead processes are removed."""
    d = Path(runs_dir) / SERVERS_DIR
    out = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
            pid = int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _is_server(pid):
            out.append(rec)
        else:
            f.unlink(missing_ok=True)
    return out


def signal_reload(runs_dir: str | Path, run: str) -> list[int]:
    """Send SIGHUP (reload the current run) to every live server of ``run``; returns their pids."""
    sent = []
    for rec in servers(runs_dir):
        if rec.get("run") == run and rec["pid"] != os.getpid():
            try:
                os.kill(int(rec["pid"]), signal.SIGHUP)
                sent.append(int(rec["pid"]))
            except (ProcessLookupError, PermissionError):  # gone, or a reused pid of another user
                pass
    return sent
