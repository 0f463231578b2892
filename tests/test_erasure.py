"""`purchase-intent forget`: erasure on request. Afterwards no file holds the user's pseudonym, every
other user's rows are as they were, one audit line names the pseudonym (never the raw id), every run
is marked stale until trained again, an unknown user changes nothing, and a crash at any point (an
exception, or kill -9 at seeded random points) leaves the old or the new workspace after recovery."""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from purchase_intent import erasure, report, runs
from purchase_intent.cli import main
from purchase_intent.privacy import load_key, pseudonym_for, pseudonymise
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
KEY = "erasure-tests-" + "k" * 32
VOLATILE = {"time", "erased_at", "last_erasure_at"}  # wall-clock fields of the audit line and the stale mark
TRAIN = ["train", "--model", "logreg", "--min-positives", "1", "--min-negatives", "1"]


def _cli(ws: Path, *args: str) -> int:
    return main(["--workspace", str(ws), *args])


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small simulated shop, fully used: ingested (with rejected rows for every user), built,
    trained, evaluated, scored and reported with example users. Returns (pristine workspace, the
    raw id and pseudonym of a user who is in every kind of file)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    root = tmp_path_factory.mktemp("erasure")
    csv = root / "shop.csv"
    write_events(SimConfig(n_users=300, days=30, seed=0), csv)
    raw_users = sorted(pd.read_csv(csv, usecols=["user_id"])["user_id"].astype(str).unique())
    with open(csv, "a") as f:  # two rejected rows per user: a timestamp that does not parse (its id is
        for u in raw_users:    # pseudonymised in rejects/) and a line with extra fields (kept as read)
            f.write(f'"{u}",not-a-time,"view","i1","c1",1.0,"s1"\n"{u}",1704068785438,"view","i1","c1",1.0,"s1","x"\n')
    ws = root / "ws"
    try:
        assert _cli(ws, "ingest", str(csv)) == 0
        assert _cli(ws, "build", "--lookback", "7d", "--horizon", "3d", "--step", "3d") == 0
        assert _cli(ws, *TRAIN) == 0
        assert _cli(ws, "evaluate", "--run", "logreg", "--n-boot", "20") == 0
        assert _cli(ws, "score", "--run", "logreg", "--quiet") == 0
        audience = ["--min-probability", "0", "--out", str(ws / "audience.csv.gz")]  # everyone, gzipped CSV
        assert _cli(ws, "score", "--run", "logreg", "--quiet", *audience) == 0
        report.write_report(ws, n_explain=20)
        pids = pseudonym_for(ws, raw_users)
        shown = set(re.findall(r"user <code>([0-9a-f]{12})</code>", (ws / "report.html").read_text()))
        scored = set(pd.concat([pd.read_parquet(p) for p in (ws / "runs" / "logreg").glob("scores-*.parquet")])
                     ["user_id"])
        raw = next(u for u in raw_users if pids[u][:12] in shown and pids[u] in scored)
    finally:
        mp.undo()
    return ws, raw, pids[raw]


@pytest.fixture
def ws(shop, tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    dest = tmp_path / "ws"
    shutil.copytree(shop[0], dest)
    return dest


def _normalised(data: bytes, suffix: str) -> bytes:
    def drop(obj):
        if isinstance(obj, dict):
            return {k: drop(v) for k, v in obj.items() if k not in VOLATILE}
        return [drop(v) for v in obj] if isinstance(obj, list) else obj
    if suffix == ".json":
        return json.dumps(drop(json.loads(data)), sort_keys=True).encode()
    if suffix == ".jsonl":
        return b"\n".join(json.dumps(drop(json.loads(line)), sort_keys=True).encode() for line in data.splitlines())
    return data


def digest(ws: Path) -> dict[str, str]:
    """Every stored file's content (Parquet: its rows; JSON: without wall-clock fields); not the lock."""
    out = {}
    for p in sorted(ws.rglob("*")):
        if not p.is_file() or p.name == ".lock":
            continue
        data = repr(pq.read_table(p).to_pydict()).encode() if p.suffix == ".parquet" else p.read_bytes()
        out[str(p.relative_to(ws))] = hashlib.sha256(_normalised(data, p.suffix)).hexdigest()
    return out


def litter(ws: Path) -> list[str]:
    """Temporary entries in the workspace or beside it (an interrupted swap's other tree)."""
    return sorted(p.name for p in [*ws.rglob(".tmp-*"), *ws.parent.glob(".tmp-*")])


def _files_holding(ws: Path, pseudonym: str) -> list[str]:
    """Every file (but the audit log) that holds the pseudonym: Parquet string columns read
    decompressed, gzip files decompressed, every other file's bytes; HTML also by the 12 characters
    a report shows."""
    hits = []
    for p in sorted(ws.rglob("*")):
        if not p.is_file() or p.name == erasure.ERASURE_LOG:
            continue
        if p.suffix == ".parquet":
            t = pq.read_table(p)
            found = any(pseudonym in str(v) for c in t.column_names if pa.types.is_string(t.schema.field(c).type)
                        for v in t.column(c).to_pylist())
        else:
            data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            found = pseudonym.encode() in data or (p.suffix == ".html" and pseudonym[:12].encode() in data)
        if found:
            hits.append(str(p.relative_to(ws)))
    return hits


def _tables(ws: Path) -> dict[str, pd.DataFrame]:
    run = ws / "runs" / "logreg"
    rejects = [pd.read_csv(p, dtype=str) for p in sorted((ws / "rejects").glob("*.csv"))]
    return {"events": pd.concat([pd.read_parquet(p) for p in sorted((ws / "events").glob("part-*.parquet"))],
                                ignore_index=True),
            "examples": pd.read_parquet(ws / "examples" / runs.EXAMPLES),
            "features": pd.read_parquet(ws / "examples" / runs.FEATURES),
            "predictions": pd.read_parquet(run / runs.PREDICTIONS),
            "scores": pd.concat([pd.read_parquet(p) for p in sorted(run.glob("scores-*.parquet"))], ignore_index=True),
            "rejects": pd.concat(rejects, ignore_index=True)}


# ---------------------------------------------------------------------------------------------
def test_forget_removes_the_user_everywhere_and_keeps_everyone_else(shop, ws, capsys):
    _, raw, pid = shop
    shutil.copytree(ws, ws.parent / "before")
    before = _tables(ws)
    assert _files_holding(ws, pid)  # the user is in events, rejects, examples, scores and the report
    mine_rejected = before["rejects"]["raw"].str.contains(pid) | before["rejects"]["raw"].str.startswith(f'"{raw}",')
    assert mine_rejected.sum() == 2
    assert _cli(ws, "forget", "--user", raw) == 0
    out = capsys.readouterr().out
    assert f"erased pseudonym {pid}" in out and raw not in out

    assert _files_holding(ws, pid) == []
    assert not (ws / "report.html").exists()  # it showed the user's pseudonym
    after = _tables(ws)
    mine = (before["examples"]["user_id"] == pid).to_numpy()
    my_examples = set(before["examples"].loc[mine, "example_id"])
    assert mine.any() and before["predictions"]["example_id"].isin(my_examples).any()
    expected = {
        "events": before["events"][before["events"]["user_id"] != pid],
        "examples": before["examples"][~mine],
        "features": before["features"][~mine],
        "predictions": before["predictions"][~before["predictions"]["example_id"].isin(my_examples)],
        "scores": before["scores"][before["scores"]["user_id"] != pid],
        "rejects": before["rejects"][~mine_rejected],
    }
    for kind, df in expected.items():
        pd.testing.assert_frame_equal(after[kind], df.reset_index(drop=True), check_like=False, obj=kind)
        assert len(after[kind]) < len(before[kind]), kind
    # the summary beside the scores counts what is left
    summary = json.loads(next((ws / "runs" / "logreg").glob("scores-*.summary.json")).read_text())
    assert summary["n_rows"] == len(after["scores"]) and summary["erased_users"] == 1
    audience = [pd.read_csv(ws.parent / "before" / "audience.csv.gz"), pd.read_csv(ws / "audience.csv.gz")]
    assert len(audience[1]) == len(audience[0]) - 1
    pd.testing.assert_frame_equal(audience[1], audience[0][audience[0]["user_id"] != pid].reset_index(drop=True))
    assert json.loads((ws / "audience.summary.json").read_text())["n_rows"] == len(audience[1])
    entry = json.loads((ws / "events" / "manifest.json").read_text())["files"][0]
    assert entry["erased"] == len(before["events"]) - len(after["events"])

    lines = (ws / erasure.ERASURE_LOG).read_text().splitlines()
    assert len(lines) == 1
    audit = json.loads(lines[0])
    assert audit["pseudonym"] == pid and audit["time"]
    assert audit["removed"] == {"events": len(before["events"]) - len(after["events"]), "rejects": 2,
                                "examples": int(mine.sum()), "predictions": len(before["predictions"]) -
                                len(after["predictions"]), "scores": 2, "reports": 1}  # scores and audience
    assert raw not in json.dumps(audit).replace(pid, "")  # the raw id is nowhere in the line
    assert oct((ws / erasure.ERASURE_LOG).stat().st_mode & 0o777) == "0o600"


def test_forget_by_pseudonym_equals_forget_by_raw_id_but_for_lines_kept_as_read(shop, ws, tmp_path):
    _, raw, pid = shop
    other = tmp_path / "other" / "ws"
    shutil.copytree(ws, other)
    assert _cli(ws, "forget", "--user", raw) == 0
    assert _cli(other, "forget", "--pseudonym", pid.upper()) == 0
    assert _files_holding(other, pid) == []
    by_raw, by_pseudonym = digest(ws), digest(other)
    differ = sorted(k for k in by_raw.keys() | by_pseudonym.keys() if by_raw.get(k) != by_pseudonym.get(k))
    assert [Path(k).parts[0] for k in differ] == ["erasure-log.jsonl", "rejects"]
    # without the raw id, a rejected line that ingest could not pseudonymise cannot be found
    assert pd.read_csv(next((other / "rejects").glob("*.csv")))["raw"].str.startswith(f'"{raw}",').sum() == 1


def test_runs_are_stale_until_trained_again(shop, ws, capsys):
    _, raw, _ = shop
    run = ws / "runs" / "logreg"
    assert _cli(ws, "score", "--run", "logreg", "--quiet") == 0
    assert "warning" not in capsys.readouterr().out
    assert _cli(ws, "forget", "--user", raw) == 0
    assert "runs marked stale (retrain them): logreg" in capsys.readouterr().out
    mark = json.loads((run / runs.STALE_JSON).read_text())
    assert mark["users"] == 1 and mark["erased_at"] and "GDPR" in mark["reason"]

    assert _cli(ws, "score", "--run", "logreg", "--quiet") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("warning: run logreg is stale") and "train it again" in out
    assert _cli(ws, "report", "--no-explain") == 0
    assert "warning: run logreg is stale" in capsys.readouterr().err
    assert "is stale" in (ws / "report.html").read_text()
    someone = pd.read_parquet(sorted(run.glob("scores-*.parquet"))[-1])["user_id"].iloc[0]
    assert _cli(ws, "explain", "--run", "logreg", "--user", someone) == 0
    assert "warning: run logreg is stale" in capsys.readouterr().err

    assert _cli(ws, *TRAIN) == 0  # training writes a fresh run folder: no mark
    assert not (run / runs.STALE_JSON).exists()
    capsys.readouterr()
    assert _cli(ws, "evaluate", "--run", "logreg", "--n-boot", "20") == 0
    assert _cli(ws, "score", "--run", "logreg", "--quiet") == 0
    assert "warning" not in capsys.readouterr().out


def test_serve_says_the_run_is_stale(shop, ws):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from purchase_intent.serve.app import create_app
    from purchase_intent.serve.routes import STALE_HEADER
    from purchase_intent.serve.settings import ServeSettings

    _, raw, _ = shop
    api_key = "erasure-test-key-0123"
    auth = {"Authorization": f"Bearer {api_key}"}
    other = next(u for u in (f"u{i}" for i in range(300)) if u != raw)
    with TestClient(create_app(ServeSettings(workspace=str(ws), run="logreg", api_keys=(api_key,)))) as c:
        assert c.get("/readyz").json()["stale"] is None
        r = c.get(f"/v1/users/{other}/score", headers=auth)
        assert r.status_code == 200 and STALE_HEADER not in r.headers
        assert _cli(ws, "forget", "--user", raw) == 0  # while serving
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and "is stale" in ready["stale"]
        r = c.get(f"/v1/users/{other}/score", headers=auth)
        assert r.status_code == 200 and "is stale" in r.headers[STALE_HEADER]
        assert c.get(f"/v1/users/{raw}/score", headers=auth).status_code == 404  # the user's events are gone


def test_unknown_user_or_nobody_changes_nothing(shop, ws, capsys):
    before = digest(ws)
    assert _cli(ws, "forget", "--user", "no-such-user") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no data of user 'no-such-user'" in err and "nothing was changed" in err
    # a known user together with an unknown one: nothing for either
    assert _cli(ws, "forget", "--user", shop[1], "--user", "no-such-user") == 1
    assert _cli(ws, "forget", "--pseudonym", "0" * 32) == 1
    capsys.readouterr()
    assert _cli(ws, "forget") == 1
    assert capsys.readouterr().err == "error: forget needs --user RAW_ID or --pseudonym P (repeatable)\n"
    assert _cli(ws, "forget", "--pseudonym", "not-hex") == 1
    assert digest(ws) == before and litter(ws) == []
    assert _cli(ws.parent / "nowhere", "forget", "--user", shop[1]) == 1
    assert not (ws.parent / "nowhere").exists()


def test_forgetting_a_user_again_is_done_not_an_error(shop, ws, capsys):
    """A re-run of an erasure job: the user erased before is reported as such (exit 0), nothing changes and no
    audit line is added; an id never seen is still an error."""
    assert _cli(ws, "forget", "--user", shop[1]) == 0
    capsys.readouterr()
    before = digest(ws)
    assert _cli(ws, "forget", "--user", shop[1]) == 0
    out = capsys.readouterr().out
    assert f"pseudonym {shop[2]}: already erased at" in out and "audit line" not in out
    assert digest(ws) == before
    assert _cli(ws, "forget", "--user", shop[1], "--user", "no-such-user") == 1


def test_a_file_forget_cannot_rewrite_stops_it_before_any_change(shop, ws, capsys):
    (ws / "notes.txt").write_text(f"call back {shop[2]}\n")
    before = digest(ws)
    assert _cli(ws, "forget", "--user", shop[1]) == 1
    assert "notes.txt holds a pseudonym" in capsys.readouterr().err
    assert digest(ws) == before and litter(ws) == []


@pytest.mark.parametrize("step", ["staging", "marking"])
def test_an_error_midway_leaves_the_old_workspace(shop, ws, monkeypatch, step, capsys):
    before = digest(ws)
    if step == "staging":  # some files linked and rewritten into the new tree, then the disk is full
        real_write, calls = pq.write_table, []

        def write_table(table, where, *a, **k):
            calls.append(where)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(where))
            return real_write(table, where, *a, **k)
        monkeypatch.setattr(pq, "write_table", write_table)
    else:  # every file staged, the stale marks half written
        def mark(run_dir, now, n):
            (Path(run_dir) / runs.STALE_JSON).write_text("{}")
            raise RuntimeError("disk on fire")
        monkeypatch.setattr(erasure, "_mark_stale", mark)
    assert _cli(ws, "forget", "--user", shop[1]) == 1
    assert "error:" in capsys.readouterr().err
    if step == "staging":
        assert len(calls) == 2
    assert digest(ws) == before and litter(ws) == []


# kill -9 at seeded random points: a forked child per point, killed by itself at the n-th file
# operation of the erasure (links, writes, chmods, renames, the swap, the deletion of the old tree)
ZYGOTE = r"""
import contextlib, io, json, os, pathlib, shutil, signal, sys
import pyarrow.parquet as pq
from purchase_intent import cli, workspace
ws, raw = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    kill_at = int(line)
    pid = os.fork()
    if pid == 0:
        calls = []
        def ticking(name, fn):
            def f(*a, **k):
                calls.append(name)
                if len(calls) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)
            return f
        for mod, name in [(os, "link"), (os, "replace"), (os, "chmod"), (os, "symlink"), (shutil, "rmtree"),
                          (pathlib.Path, "write_bytes"), (pathlib.Path, "write_text"), (pq, "write_table"),
                          (workspace, "_exchange")]:
            setattr(mod, name, ticking(name, getattr(mod, name)))
        with contextlib.redirect_stdout(io.StringIO()):  # stdout carries this protocol's lines only
            rc = cli.main(["--workspace", ws, "forget", "--user", raw])
        print(json.dumps({"rc": rc, "calls": calls}), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        print(json.dumps({"signal": os.WTERMSIG(status)}), flush=True)
"""


def test_kill_9_at_random_points_leaves_old_or_new(shop, tmp_path):
    pristine, raw, _ = shop
    ws = tmp_path / "ws"
    env = {**os.environ, "PURCHASE_INTENT_PSEUDONYM_KEY": KEY, "PYTHONPATH": str(REPO)}
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(ws), raw], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def attempt(kill_at: int) -> dict:
        if ws.exists():
            shutil.rmtree(ws)
        shutil.copytree(pristine, ws)
        zygote.stdin.write(f"{kill_at}\n")
        zygote.stdin.flush()
        return json.loads(zygote.stdout.readline())

    try:
        full = attempt(0)  # no kill: the finished erasure and its file operations, in order
        assert full["rc"] == 0
        after = digest(ws)
        shutil.rmtree(ws)
        shutil.copytree(pristine, ws)
        before = digest(ws)
        assert after != before
        calls = full["calls"]
        swap = calls.index("_exchange") + 1
        rng = random.Random(0)
        points = sorted(rng.sample(range(1, len(calls) + 1), 5)) + [swap, swap + 1]  # and just before/after it
        outcomes = []
        for n in points:
            assert attempt(n) == {"signal": signal.SIGKILL}
            assert litter(ws)  # a killed erasure leaves its other tree beside the workspace
            with Workspace(ws).lock("check"):  # the next command: a dead holder's record makes it recover
                pass
            now = digest(ws)
            assert now in (before, after), f"kill at operation {n} ({calls[n - 1]}) left neither old nor new"
            assert litter(ws) == []
            outcomes.append("old" if now == before else "new")
        assert outcomes[-2:] == ["old", "new"]  # killed just before the swap / right after it
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)


def test_forget_finds_a_float_id_an_earlier_reader_stored_as_written(tmp_path, monkeypatch):
    """A workspace whose files were read when '13085.0' was stored as written (its own pseudonym): forget
    --user 13085 and --user 13085.0 both find and erase it; a broken line holding '13085.0' as read goes too."""
    from purchase_intent import events as ev
    from purchase_intent.config import DataConfig

    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "ab" * 32)
    src = tmp_path / "log.csv"
    src.write_text("user_id,ts,event,category\n13085.0,2024-03-01T10:00:00Z,view,a\n7.0,2024-03-01T11:00:00Z,view,b\n"
                   "555.0,yesterday,view,d\n"  # a user with a rejected row only
                   '13085.0,2024-03-01T12:00:00Z,view,"c\n')
    for user in ("13085", "13085.0"):
        ws = tmp_path / f"ws-{user}"
        with monkeypatch.context() as m:  # the reader of b2b97d0: ids as written
            m.setattr(ev, "_id_of_trimmed", lambda t: f"NULLIF({t}, '')")
            ev.ingest(ws, [src], DataConfig(format="csv"), progress=False)
        stored = Workspace(ws).connect().sql("SELECT DISTINCT user_id FROM events").fetchall()
        assert pseudonym_for(ws, ["13085"])["13085"] not in {r[0] for r in stored}  # stored as '13085.0'
        from purchase_intent.explain import _resolve_user  # explain --user finds it too
        assert _resolve_user(Workspace(ws).connect(), Workspace(ws), user) in {r[0] for r in stored}
        r = erasure.forget(ws, users=[user])
        assert sum(n["events"] for n in r.removed.values()) == 1
        assert Workspace(ws).connect().sql("SELECT count(*) FROM events").fetchall() == [(1,)]
        rejects = "".join(p.read_text() for p in (ws / "rejects").glob("*.csv"))
        assert "13085" not in rejects
        old_pid = pseudonymise(["555.0"], load_key(ws))[0]  # as the earlier reader stored the reject
        assert old_pid in rejects
        assert erasure.forget(ws, users=["555"]).removed[old_pid]["rejects"] == 1
        assert old_pid not in "".join(p.read_text() for p in (ws / "rejects").glob("*.csv"))
