"""Workspace layout, atomic writes and clean-up of what a killed process left behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from purchase_intent.workspace import NothingIngestedError, Workspace, atomic_dir, atomic_write_text, clean_tmp
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
    with ws.lock():
        removed = ws.recover()
    assert {p.name for p in removed} == {"part-deadbeef.parquet", "deadbeef.csv"}
