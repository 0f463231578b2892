"""Workspace layout, atomic writes and clean-up of what a killed process left behind."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from purchase_intent.workspace import (
    DamagedWorkspaceError,
    NothingIngestedError,
    Workspace,
    WorkspaceWriteError,
    atomic_dir,
    atomic_write_text,
    clean_tmp,
)
from purchase_intent.workspace import tmp_path as make_tmp


def test_layout_and_run_dir(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    assert ws.examples_dir == tmp_path / "examples" and ws.runs_dir == tmp_path / "runs"
    assert ws.run_dir("lightgbm") == tmp_path / "runs" / "lightgbm"
    assert ws.run_dir(tmp_path / "elsewhere" / "run1") == tmp_path / "elsewhere" / "run1"
    assert ws.run_dir("some/dir") == Workspace(tmp_path).run_dir("some/dir")
    assert str(ws.run_dir("some/dir")) == "some/dir"
    monkeypatch.setenv("PURCHASE_INTENT_WORKSPACE", str(tmp_path / "envws"))
    assert Workspace().root == tmp_path / "envws"
    monkeypatch.delenv("PURCHASE_INTENT_WORKSPACE")
    assert Workspace().root.name == "pi-workspace"


def test_connect_without_events_is_a_clear_error(tmp_path):
    with pytest.raises(NothingIngestedError, match="ingest"):
        Workspace(tmp_path).connect()


def test_atomic_write_text(tmp_path):
    p = tmp_path / "a" / "b.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and os.listdir(p.parent) == ["b.json"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "runs" / "r1"
    with atomic_dir(target) as d:
        (d / "x.txt").write_text("1")
        assert not target.exists()
    assert (target / "x.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "x.txt").write_text("2")
            raise RuntimeError("fail")
    assert (target / "x.txt").read_text() == "1"  # untouched on failure
    with atomic_dir(target) as d:
        (d / "y.txt").write_text("3")
    assert sorted(os.listdir(target)) == ["y.txt"]  # replaced on success
    assert os.listdir(target.parent) == ["r1"]


def test_leftovers_of_dead_process_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".tmp-{pid}-abcd1234-x.json").write_text("partial")
    (tmp_path / f".tmp-{pid}-abcd1234-dir").mkdir()
    mine = make_tmp(tmp_path / "mine.json")
    mine.write_text("in progress")  # a live writer's temp file is kept
    removed = clean_tmp(tmp_path)
    assert len(removed) == 2 and os.listdir(tmp_path) == [mine.name]


def test_recover_removes_uncommitted_parts(tmp_path):
    ws = Workspace(tmp_path)
    ws.events_dir.mkdir(parents=True)
    (ws.events_dir / "part-deadbeef.parquet").write_bytes(b"x")
    ws.rejects_dir.mkdir()
    (ws.rejects_dir / "deadbeef.csv").write_text("x")
    with ws.lock("test"):
        removed = ws.recover()
    assert {p.name for p in removed} == {"part-deadbeef.parquet", "deadbeef.csv"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_rewrite_removes_what_a_killed_write_of_the_same_path_left(tmp_path):
    pid = _dead_pid()
    (tmp_path / f".tmp-{pid}-abcd1234-run.json").write_text("half")
    (tmp_path / f".tmp-{pid}-abcd1234-other.json").write_text("half")
    atomic_write_text(tmp_path / "run.json", "whole")
    assert sorted(os.listdir(tmp_path)) == [f".tmp-{pid}-abcd1234-other.json", "run.json"]
    (tmp_path / f".tmp-{pid}-abcd1234-lightgbm").mkdir()
    with atomic_dir(tmp_path / "lightgbm") as d:
        (d / "m.txt").write_text("m")
    assert sorted(os.listdir(tmp_path)) == [f".tmp-{pid}-abcd1234-other.json", "lightgbm", "run.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS])
def test_a_refused_write_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    p = tmp_path / "run.json"
    atomic_write_text(p, "old")
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "model.txt").write_text("old model")

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(WorkspaceWriteError, match=f"cannot write .*run.json: {os.strerror(code)}"):
        atomic_write_text(p, "new")
    with pytest.raises(WorkspaceWriteError, match="r1"):
        with atomic_dir(tmp_path / "runs" / "r1") as d:
            (d / "model.txt").write_text("new model")
    monkeypatch.undo()
    assert p.read_text() == "old" and (tmp_path / "runs" / "r1" / "model.txt").read_text() == "old model"
    assert not list(tmp_path.rglob(".tmp-*"))
    with pytest.raises(FileNotFoundError):  # not a storage fault: passed through as it is
        with atomic_dir(tmp_path / "runs" / "r2"):
            open(tmp_path / "missing" / "x", "rb")


def test_a_damaged_events_part_is_named_with_its_source(tmp_path):
    ws = Workspace(tmp_path)
    ws.events_dir.mkdir(parents=True)
    pd.DataFrame({"user_id": ["u"], "ts": [pd.Timestamp("2024-03-01")]}).to_parquet(ws.events_dir / "part-a.parquet")
    atomic_write_text(ws.manifest_path, json.dumps({"version": 1, "key_id": None, "files": [
        {"sha256": "a", "source": "/data/shop.csv", "parts": ["part-a.parquet"]}]}))
    assert ws.connect().sql("SELECT count(*) FROM events").fetchall() == [(1,)]
    part = ws.events_dir / "part-a.parquet"
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(DamagedWorkspaceError, match="part-a.parquet cannot be read: it is damaged.*/data/shop.csv"):
        ws.connect()


def test_replacing_a_directory_is_one_atomic_swap(tmp_path, monkeypatch):
    # with two renames (old aside, new in), a kill between them would leave no directory at all
    target = tmp_path / "examples"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("old")

    def no_rename(*a, **k):
        raise AssertionError("replaced with os.replace, not swapped")
    monkeypatch.setattr(os, "replace", no_rename)
    try:
        with atomic_dir(target) as d:
            (d / "a.txt").write_text("new")
    except AssertionError:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    assert (target / "a.txt").read_text() == "new" and os.listdir(tmp_path) == ["examples"]
