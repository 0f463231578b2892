"""The workspace lock: one writing command at a time, across real processes; a killed holder never blocks."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from purchase_intent.workspace import RESTORE_MARKER, Workspace, WorkspaceBusy

REPO = Path(__file__).resolve().parents[1]


def _holder(root: Path, command: str, then: str = "time.sleep(60)") -> subprocess.Popen:
    """A child process that takes the lock, leaves a temp file, prints READY and then runs ``then``."""
    script = textwrap.dedent(f"""
        import sys, time
        from purchase_intent.workspace import Workspace, tmp_path
        ws = Workspace({str(root)!r})
        with ws.lock({command!r}):
            ws.runs_dir.mkdir(parents=True, exist_ok=True)
            tmp_path(ws.runs_dir / "half-written").mkdir()
            print("READY", flush=True)
            {then}
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "READY"
    return child


def test_a_second_command_is_refused_while_the_first_runs(tmp_path):
    ws = Workspace(tmp_path / "ws")
    child = _holder(ws.root, "ingest")
    try:
        with pytest.raises(WorkspaceBusy) as e:
            with ws.lock("build"):
                pass
        msg = str(e.value)
        assert "another ingest is running" in msg and f"(pid {child.pid})" in msg and "wait for it" in msg
        assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", msg)
        assert ws.lock_holder()["pid"] == child.pid
        # the CLI's ingest takes the same lock: one clear line, exit code 1, nothing stored
        src = tmp_path / "in.csv"
        src.write_text("user_id,ts,event\nu1,2024-03-01T00:00:00Z,view\n")
        run = subprocess.run([sys.executable, "-m", "purchase_intent.cli", "--workspace", str(ws.root), "ingest",
                              str(src)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("error: another ingest is running")
        assert not ws.manifest_path.exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_a_killed_holder_leaves_a_record_that_does_not_block(tmp_path):
    ws = Workspace(tmp_path / "ws")
    child = _holder(ws.root, "train")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    record = json.loads((ws.root / ".lock").read_text())
    assert record["command"] == "train" and record["pid"] == child.pid  # the stale record is still there
    assert [p.name for p in ws.runs_dir.iterdir()][0].startswith(".tmp-")
    assert ws.lock_holder() is None
    with ws.lock("build"):
        assert json.loads((ws.root / ".lock").read_text())["pid"] == os.getpid()
        assert list(ws.runs_dir.iterdir()) == []  # what the killed command half-wrote is removed
    assert (ws.root / ".lock").read_text() == ""  # released: no record


def test_commands_are_serialised_and_a_finished_holder_releases(tmp_path):
    ws = Workspace(tmp_path / "ws")
    child = _holder(ws.root, "score", then="sys.stdin.readline()")  # holds until told to finish
    try:
        with pytest.raises(WorkspaceBusy, match="another score"):
            with ws.lock("report"):
                pass
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert ws.lock_holder() is None
    with ws.lock("report"):
        with ws.lock("ingest"):  # nested in one process: allowed (run -> ingest)
            assert ws.lock_holder() is not None
    assert ws.lock_holder() is None


def test_read_only_workspace_lets_readers_through(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    ws.root.chmod(0o555)
    try:
        with ws.lock("score"):
            pass
    finally:
        ws.root.chmod(0o755)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _snapshot(parent: Path, name: str, pid: int, record: bytes, content: str) -> Path:
    """A snapshot tree as `all_or_nothing` leaves it when killed: marker holding the lock record."""
    snap = parent / f".tmp-{pid}-abcd1234-{name}"
    snap.mkdir()
    (snap / "content.txt").write_text(content)
    (snap / RESTORE_MARKER).write_bytes(record)
    return snap


def test_recovery_restores_only_the_snapshot_of_the_holder_that_died(tmp_path):
    """The stale record left in the lock file names the one snapshot to put back: not a sibling
    workspace's (whose name ends with this one's), not a marked leftover of another command."""
    ws, sibling = Workspace(tmp_path / "ws"), tmp_path / "my-ws"
    ws.root.mkdir()
    sibling.mkdir()
    (ws.root / "content.txt").write_text("changed")
    pid = _dead_pid()
    record = json.dumps({"command": "retrain", "pid": pid, "started": 1.0}).encode()
    theirs = _snapshot(tmp_path, "my-ws", pid, record, "sibling's snapshot")
    old = _snapshot(tmp_path, "ws", _dead_pid(), json.dumps({"command": "retrain", "pid": 1, "started": 0.5}).encode(),
                    "an older snapshot")
    (ws.root / ".lock").write_bytes(record)  # the record of the killed holder
    with ws.lock("ingest"):
        assert (ws.root / "content.txt").read_text() == "changed"  # nothing of this workspace's matched
    assert theirs.is_dir() and (theirs / RESTORE_MARKER).is_file()  # the sibling's is left alone
    assert not old.exists()  # a leftover that is not the dead holder's is deleted, never restored

    mine = _snapshot(tmp_path, "ws", pid, record, "before")
    (ws.root / ".lock").write_bytes(record)
    with ws.lock("ingest"):
        assert (ws.root / "content.txt").read_text() == "before" and not (ws.root / RESTORE_MARKER).exists()
    assert not mine.exists() and theirs.is_dir()


def test_a_finished_all_or_nothing_removes_the_marker_before_the_snapshot(tmp_path, monkeypatch):
    """A kill while the snapshot is being deleted must not leave a restorable half tree."""
    import shutil

    from purchase_intent import workspace

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    (ws.root / "content.txt").write_text("before")
    seen = []
    real = shutil.rmtree

    def rmtree(path, *a, **k):
        seen.append((Path(path).name, (Path(path) / RESTORE_MARKER).exists()))
        return real(path, *a, **k)

    monkeypatch.setattr(workspace.shutil, "rmtree", rmtree)
    with ws.lock("retrain"):
        with workspace.all_or_nothing(ws.root) as atomic:
            assert atomic
            (ws.root / "content.txt").unlink()
            (ws.root / "content.txt").write_text("after")
    assert seen and all(not marked for _, marked in seen)
    assert (ws.root / "content.txt").read_text() == "after"
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]
