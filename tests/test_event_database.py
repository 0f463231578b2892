"""Events from PostgreSQL (event_database): against a real server that these tests start (pg_cluster).

A simulated shop's events go into a table with COPY; ingesting the table must give exactly the
events (and pseudonyms) that ingesting the same rows from a Parquet file gives. Then: rejects,
``--since-last``, idempotence, every bad-input case (one line, in time, no password), and no file of
the workspace holds the password.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pg_cluster import PASSWORD, server_bin, start_cluster

from purchase_intent import cli, pipeline
from purchase_intent.config import DataConfig
from purchase_intent.event_database import DatabaseError, DatabaseQuery, is_database_url
from purchase_intent.events import IngestRejectedError
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

KEY = "00112233445566778899aabbccddeeff"
COLUMNS = ("user_id text, ts bigint, event text, item_id text, category text, price double precision, "
           "session_id text")
SIM = SimConfig(n_users=150, days=21, seed=3)
CUT_MS = 1_704_067_200_000 + 14 * 86_400_000  # 14 days into the simulated log (2024-01-15)
SECRETS = (PASSWORD.encode(), "Pw-7%25q%21Zr8-x".encode())


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    """A running server whose database ``shop`` holds ``events`` (the simulated shop, via COPY) and the same
    rows as Parquet (``pg.parquet``)."""
    pytest.importorskip("adbc_driver_postgresql", reason="the postgres extra (adbc-driver-postgresql) is missing")
    if server_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    d = tmp_path_factory.mktemp("pg-data")
    write_events(SIM, d / "events.csv")
    write_events(SIM, d / "events.parquet")
    cluster = start_cluster()
    try:
        cluster.admin(f"CREATE TABLE events ({COLUMNS})", "GRANT SELECT ON events TO shop")
        cluster.copy_csv("events", d / "events.csv")
        cluster.parquet = d / "events.parquet"
        cluster.n_rows = pq.read_metadata(d / "events.parquet").num_rows
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)


def _events(ws_root: Path) -> pd.DataFrame:
    con = Workspace(ws_root).connect()
    try:
        return con.sql("SELECT * FROM events ORDER BY ts, user_id, event, item_id, session_id").df()
    finally:
        con.close()


def _ingest(ws: Path, *args: str) -> int:
    return cli.main(["ingest", "--workspace", str(ws), *args])


def _manifest(ws: Path) -> dict:
    return json.loads((ws / "events" / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
def test_ingest_from_postgres_equals_ingest_from_parquet(pg, tmp_path):
    assert _ingest(tmp_path / "db", "--data", pg.url(), "--query", "SELECT * FROM events;") == 0
    assert _ingest(tmp_path / "pq", pg.parquet.as_posix(), "--format", "parquet") == 0
    db, ref = _events(tmp_path / "db"), _events(tmp_path / "pq")
    assert len(db) == pg.n_rows > 1000
    pd.testing.assert_frame_equal(db, ref)  # same events, same pseudonyms (same key)
    entry = _manifest(tmp_path / "db")["files"][0]
    assert entry["source"] == f"postgresql://shop@127.0.0.1:{pg.port}/shop"
    assert entry["database"]["query"] == "SELECT * FROM events" and entry["rows_read"] == pg.n_rows
    # the same query over the same rows is a load already done: skipped, nothing added
    assert _ingest(tmp_path / "db", "--data", pg.url(), "--query", "SELECT * FROM events") == 0
    assert len(_manifest(tmp_path / "db")["files"]) == 1


def test_a_timestamp_column_gives_the_same_events(pg, tmp_path):
    pg.admin("CREATE TABLE events_tz AS SELECT user_id, timestamptz 'epoch' + ts * interval '1 millisecond' AS "
             "event_time, event AS kind, item_id, category, price, session_id FROM events",
             "GRANT SELECT ON events_tz TO shop")
    q = DatabaseQuery(pg.url(), "SELECT * FROM events_tz")
    pipeline.ingest(q, DataConfig(mapping={"ts": "event_time", "event": "kind"}), tmp_path / "tz", progress=False)
    pipeline.ingest(pg.parquet, DataConfig(format="parquet"), tmp_path / "pq", progress=False)
    pd.testing.assert_frame_equal(_events(tmp_path / "tz"), _events(tmp_path / "pq"))
    # --since-last compares in the column's own type: one row 1 ms after the newest is the only new one
    since = dataclasses.replace(q, since_last=True)
    cfg = DataConfig(mapping={"ts": "event_time", "event": "kind"})
    assert pipeline.ingest(since, cfg, tmp_path / "tz", progress=False).skipped  # nothing newer yet
    pg.admin("INSERT INTO events_tz SELECT 'late-user', max(event_time) + interval '1 millisecond', 'view', "
             "NULL, NULL, NULL, NULL FROM events_tz")
    report = pipeline.ingest(since, cfg, tmp_path / "tz", progress=False)
    assert report.accepted == 1 and report.files[0].rows_read == 1


def test_bad_rows_are_rejected_with_reasons(pg, tmp_path):
    pg.admin("CREATE TABLE messy (visitor text, at text, action text, amount numeric(10, 2))",
             "INSERT INTO messy VALUES ('alice', '2024-01-02T10:00:00Z', 'view', 9.50),"
             " (NULL, '2024-01-02T10:01:00Z', 'view', 1),"          # row 2: no user
             " ('bob', 'yesterday-ish', 'view', 1),"               # row 3: a time that does not parse
             " ('carol', '1970-01-02T10:03:00Z', 'view', 1),"      # row 4: a time before 1990
             " ('dave', '2024-01-02T10:04:00Z', 'cart', -3),"      # row 5: a negative price
             " ('erin', NULL, 'view', 2)",                          # row 6: no time
             "GRANT SELECT ON messy TO shop")
    ws = tmp_path / "ws"
    q = DatabaseQuery(pg.url(), "SELECT * FROM messy ORDER BY at NULLS LAST, visitor NULLS FIRST")
    cfg = DataConfig(mapping={"user_id": "visitor", "ts": "at", "event": "action", "price": "amount"})
    with pytest.raises(IngestRejectedError):  # --strict: nothing stored
        pipeline.ingest(q, dataclasses.replace(cfg, strict=True), ws, progress=False)
    assert not (ws / "events" / "manifest.json").exists()
    report = pipeline.ingest(q, cfg, ws, progress=False)
    assert report.accepted == 1
    assert report.rejected == {"bad_ts": 1, "implausible_ts": 1, "missing_ts": 1, "missing_user": 1,
                               "negative_price": 1}
    rejects = pd.read_csv(report.rejects_paths[0])
    assert set(rejects["source_file"]) == {f"postgresql://shop@127.0.0.1:{pg.port}/shop"}
    by_reason = dict(zip(rejects["reason"], rejects["line"]))  # line: the row's number in the query's result
    assert by_reason == {"implausible_ts": 1, "missing_user": 3, "negative_price": 4, "bad_ts": 5, "missing_ts": 6}
    raw = [json.loads(r) for r in rejects["raw"]]
    assert not {"bob", "carol", "dave"} & {r["visitor"] for r in raw}  # ids pseudonymised
    assert next(r for r in raw if r["action"] == "cart")["amount"] == "-3.00"  # numeric arrives as its text


def test_since_last_adds_only_new_rows(pg, tmp_path):
    """The ts column comes through --map (created_at); the second load reads only rows after the first's newest."""
    pg.admin("CREATE TABLE growing AS SELECT user_id, ts AS created_at, event, item_id, category, price, session_id "
             f"FROM events WHERE ts < {CUT_MS}", "GRANT SELECT ON growing TO shop")
    ws = tmp_path / "ws"
    args = ["--data", pg.url(), "--query", "SELECT * FROM growing", "--map", "ts=created_at", "--since-last"]
    assert _ingest(ws, *args) == 0
    first = _manifest(ws)["files"][0]
    assert 0 < first["accepted"] < pg.n_rows and first["database"]["after"] is None
    pg.admin(f"INSERT INTO growing SELECT * FROM events WHERE ts >= {CUT_MS}")
    assert _ingest(ws, *args) == 0
    second = _manifest(ws)["files"][1]
    assert second["database"]["after"] == first["database"]["newest"]
    assert first["accepted"] + second["accepted"] == pg.n_rows  # every row once, none twice
    pd.testing.assert_frame_equal(_events(ws), _events(_parquet_ws(pg, tmp_path)))
    before = (ws / "events" / "manifest.json").read_bytes()
    assert _ingest(ws, *args) == 0  # nothing new: nothing changes
    assert (ws / "events" / "manifest.json").read_bytes() == before
    other_ts = ["--data", pg.url(), "--query", "SELECT *, created_at + 1 AS t2 FROM growing", "--map", "ts=t2"]
    assert _ingest(ws, *other_ts, "--since-last") == 0  # another query: a source of its own, read in full
    with pytest.raises(DatabaseError, match="took the time from column 't2'"):
        q = DatabaseQuery(pg.url(), "SELECT *, created_at + 1 AS t2 FROM growing", since_last=True)
        pipeline.ingest(q, DataConfig(mapping={"ts": "created_at"}), ws, progress=False)
    assert (ws / "events" / "manifest.json").read_bytes() != before


def _parquet_ws(pg, tmp_path: Path) -> Path:
    pipeline.ingest(pg.parquet, DataConfig(format="parquet"), tmp_path / "pq", progress=False)
    return tmp_path / "pq"


def test_the_password_may_come_from_pgpassword(pg, tmp_path, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    q = DatabaseQuery(pg.url(password=None), "SELECT * FROM events WHERE event = 'purchase'")
    assert pipeline.ingest(q, DataConfig(), tmp_path / "ws", progress=False).accepted > 0


# ---------------------------------------------------------------------------------------------
# bad input: one line, within 10 s, no password, the workspace as it was
@pytest.mark.parametrize("case, url_kw, query, expected", [
    ("no server", dict(port=1), "SELECT * FROM events", "cannot connect to postgresql://shop@127.0.0.1:1/shop: "),
    ("wrong password", dict(password="Wrong-%pw!"), "SELECT * FROM events", "password authentication failed"),
    ("no database", dict(db="nope"), "SELECT * FROM events", 'database "nope" does not exist'),
    ("missing table", {}, "SELECT * FROM no_such_table", 'relation "no_such_table" does not exist'),
    ("syntax error", {}, "SELEC * FROM events", 'syntax error at or near "SELEC"'),
    ("error while rows stream", {}, "SELECT user_id, ts / (ts - ts) AS ts, event FROM events", "division by zero"),
    ("no such column", {}, "SELECT user_id, event FROM events", "no column for ['ts']"),
])
def test_bad_input_is_one_clear_line(pg, tmp_path, capsys, case, url_kw, query, expected):
    url = pg.url(**{k: v for k, v in url_kw.items() if k != "port"})
    if "port" in url_kw:
        url = url.replace(f":{pg.port}/", f":{url_kw['port']}/")
    ws = tmp_path / "ws"
    t0 = time.perf_counter()
    assert _ingest(ws, "--data", url, "--query", query) == 1
    assert time.perf_counter() - t0 < 10
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    for secret in ("Wrong-%pw!", "Wrong-%25pw%21", PASSWORD, "Pw-7%25q%21Zr8-x"):
        assert secret not in out + err
    assert not (ws / "events" / "manifest.json").exists()


def test_a_server_that_never_answers_times_out(tmp_path, capsys):
    """A port that accepts the connection but never answers (a hung server, a proxy): the connect timeout."""
    pytest.importorskip("adbc_driver_postgresql", reason="the postgres extra (adbc-driver-postgresql) is missing")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever reads or writes
        url = f"postgresql://shop:{quote(PASSWORD, safe='')}@127.0.0.1:{silent.getsockname()[1]}/shop"
        t0 = time.perf_counter()
        assert _ingest(tmp_path / "ws", "--data", url, "--query", "SELECT 1") == 1
        seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert 3 < seconds < 10 and "timeout expired" in err and err.count("\n") == 1, (seconds, err)
    assert PASSWORD not in err and quote(PASSWORD, safe="") not in err


def test_a_missing_driver_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "adbc_driver_postgresql", None)
    monkeypatch.setitem(sys.modules, "adbc_driver_postgresql.dbapi", None)
    assert _ingest(tmp_path / "ws", "--data", "postgresql://u:secret-pw@localhost/db", "--query", "SELECT 1") == 1
    err = capsys.readouterr().err
    assert "pip install 'purchase-intent[postgres]'" in err and "secret-pw" not in err


def test_command_line_checks(tmp_path, capsys):
    with pytest.raises(SystemExit, match="ingest needs PATH"):
        _ingest(tmp_path / "ws")
    with pytest.raises(SystemExit, match="needs --query"):
        _ingest(tmp_path / "ws", "--data", "postgresql://u@h/db")
    with pytest.raises(SystemExit, match="--since-last applies to a database source"):
        _ingest(tmp_path / "ws", "events.csv", "--since-last")
    with pytest.raises(SystemExit, match="exactly one --data"):
        _ingest(tmp_path / "ws", "events.csv", "--data", "postgresql://u@h/db", "--query", "SELECT 1")


# ---------------------------------------------------------------------------------------------
# the URL: shown without credentials; identity without user and password
def test_urls_are_shown_without_credentials():
    q = DatabaseQuery("postgresql://shop:p%40ss@DB.example.com:6543/shop?sslmode=require&password=other", "SELECT 1;")
    assert str(q) == repr(q).split("'")[1] == "postgresql://shop@db.example.com:6543/shop"
    assert "p%40ss" not in repr(q) and "other" not in repr(q)
    assert q.scrub("auth failed for p@ss / p%40ss / other") == "auth failed for *** / *** / ***"
    same = DatabaseQuery("postgres://reader@db.example.com:6543/shop", "  SELECT 1 ")
    assert q.source_id == same.source_id  # user, password and spacing do not change the source
    assert DatabaseQuery("postgresql://db.example.com/shop", "SELECT 1").source_id == \
        DatabaseQuery("postgresql://db.example.com:5432/shop", "SELECT 1").source_id
    assert q.source_id != DatabaseQuery("postgresql://db.example.com:6543/other", "SELECT 1").source_id
    assert "connect_timeout=4" in DatabaseQuery("postgresql://h/db", "SELECT 1").connect_uri()
    assert DatabaseQuery("postgresql://h/db?connect_timeout=9", "x").connect_uri().count("connect_timeout") == 1
    socket = DatabaseQuery("postgresql://u:pw@/shop?host=/var/run/postgresql", "SELECT 1")
    assert str(socket) == "postgresql://u@/shop?host=/var/run/postgresql"
    assert is_database_url("PostgreSQL://h/db") and not is_database_url("events.csv")
    assert issubclass(DatabaseError, ValueError)


# ---------------------------------------------------------------------------------------------
def test_run_from_postgres_leaves_no_password_in_the_workspace(pg, tmp_path):
    """`run` end to end from the database (with a rejected row, so a rejects file is written too)."""
    pg.admin("CREATE VIEW events_and_a_bad_row AS SELECT * FROM events UNION ALL "
             "SELECT 'u1', NULL, 'view', 'i1', 'c1', 1.0, 's1'", "GRANT SELECT ON events_and_a_bad_row TO shop")
    ws = tmp_path / "ws"
    rc = cli.main(["run", "--workspace", str(ws), "--data", pg.url(), "--query", "SELECT * FROM events_and_a_bad_row",
                   "--models", "logreg", "--lookback", "7d", "--horizon", "3d", "--step", "3d", "--n-boot", "20",
                   "--min-positives", "5", "--min-negatives", "5"])
    assert rc == 0
    assert (ws / "runs" / "logreg" / "run.json").exists() and list((ws / "rejects").glob("*.csv"))
    files = [p for p in ws.rglob("*") if p.is_file()]
    assert len(files) > 5
    for p in files:
        data = p.read_bytes()
        assert not any(s in data for s in SECRETS), p


@pytest.mark.slow
def test_bench_postgres_runs_and_both_sources_agree():
    if server_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_postgres.py"
    out = subprocess.run([sys.executable, str(bench), "--events", "3000", "--repeat", "1"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["events"] == 3000 and result["ratio_db_over_parquet"] > 0
    assert {"db", "parquet", "fetch_db", "read_parquet"} <= set(result)
