"""Ingest: presets, mapping, rejects with line numbers, idempotence, atomicity, strict, window."""
from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from purchase_intent import events as ev
from purchase_intent.config import DataConfig
from purchase_intent.events import IngestRejectedError, ingest
from purchase_intent.privacy import KEY_ENV, pseudonym_for
from purchase_intent.workspace import Workspace

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
RAW_USERS = ["alice-raw", "bob-raw", "carol-raw", "dave-raw", "erin-raw", "frank-raw", "grace-raw",
             "heidi-raw", "ivan-raw", "judy-raw", "mallory-raw", "niaj-raw", "olivia-raw", "peggy-raw"]
JSONL_CFG = DataConfig(format="jsonl", mapping=dict(user_id="visitor", ts="when", event="action", item_id="sku",
                                                    price="amount"),
                       event_map=dict(buy="purchase", addtocart="cart"))


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the workspace except the lock, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _rejects(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_reject_reason_with_line_numbers(tmp_path):
    # strict_events: the unknown name "teleport" is a reject (by default it is stored as other)
    r = ingest(tmp_path, [DATA / "rejects.csv"], DataConfig(format="csv", since="2024-01-01", strict_events=True),
               progress=False)
    assert r.accepted == 4 and r.filtered == 1
    assert r.rejected == {"bad_price": 1, "bad_ts": 1, "implausible_ts": 2, "malformed_line": 2, "missing_ts": 1,
                          "missing_user": 1, "negative_price": 1, "unknown_event": 1}
    n_rows = len((DATA / "rejects.csv").read_text().splitlines()) - 1
    f = r.files[0]
    assert f.rows_read == n_rows == f.accepted + f.filtered + sum(f.rejected.values())
    rows = _rejects(r.rejects_paths[0])
    assert [(int(x["line"]), x["reason"]) for x in rows] == [
        (3, "missing_user"), (4, "missing_ts"), (5, "bad_ts"), (6, "implausible_ts"), (7, "unknown_event"),
        (8, "bad_price"), (9, "negative_price"), (10, "malformed_line"), (12, "malformed_line"),
        (14, "implausible_ts")]
    assert all(x["source_file"].endswith("rejects.csv") for x in rows)
    assert "teleport" in rows[4]["raw"] and rows[7]["raw"].endswith(",EXTRA")
    # the raw user and session ids are replaced by their pseudonyms in the rejects file
    text = r.rejects_paths[0].read_text()
    assert not any(u in text for u in RAW_USERS)
    assert pseudonym_for(tmp_path, ["bob-raw"])["bob-raw"] in rows[1]["raw"]

    con = Workspace(tmp_path).connect()
    df = con.sql("SELECT * FROM events ORDER BY ts").df()
    assert list(df.columns[:7]) == ["user_id", "ts", "event", "item_id", "category", "price", "session_id"]
    assert "brand_name" not in df.columns  # an extra column is left out unless --keep-extras
    assert df["ts"].astype(str).tolist() == ["2024-03-01 10:00:00", "2024-03-01 10:00:00",
                                            "2024-03-01 10:00:00", "2024-03-02 08:00:00"]
    assert sorted(df["event"]) == ["cart", "purchase", "view", "wishlist"]
    assert df["price"].isna().sum() == 1  # empty price is allowed


def test_raw_ids_absent_from_workspace(tmp_path):
    ingest(tmp_path, [DATA / "rejects.csv"], DataConfig(format="csv", keep_extras=True), progress=False)
    ingest(tmp_path, [DATA / "mapped.jsonl"], dataclasses.replace(JSONL_CFG, keep_extras=True), progress=False)
    con = Workspace(tmp_path).connect()
    values = set()
    for col in ("user_id", "session_id", "item_id", "category", "brand_name", "page_type"):
        values |= {str(v) for (v,) in con.sql(f"SELECT DISTINCT {col} FROM events").fetchall()}
    assert not any(u in v for u in RAW_USERS for v in values)
    pids = set(pseudonym_for(tmp_path, RAW_USERS).values())
    users = {v for (v,) in con.sql("SELECT DISTINCT user_id FROM events").fetchall()}
    assert users <= pids and len(users) == 8
    for p in tmp_path.rglob("*.csv"):
        assert not any(u in p.read_text() for u in RAW_USERS)


def test_jsonl_mapping_iso_zones(tmp_path):
    r = ingest(tmp_path, [DATA / "mapped.jsonl"], dataclasses.replace(JSONL_CFG, keep_extras=True), progress=False)
    assert r.accepted == 4 and r.rejected == {"malformed_line": 1}
    assert [int(x["line"]) for x in _rejects(r.rejects_paths[0])] == [5]  # line 4 is blank
    df = Workspace(tmp_path).connect().sql("SELECT * FROM events ORDER BY item_id").df()
    assert df["item_id"].tolist() == ["10", "7", "8", "9"]
    assert df["ts"].astype(str).tolist() == ["2024-03-01 10:00:00", "2024-03-01 09:00:00",
                                            "2024-03-01 10:00:00", "2024-03-01 15:00:00"]
    assert df["event"].tolist() == ["view", "cart", "view", "purchase"]
    assert "page_type" in df.columns and df["price"].iloc[1] == 9.5 and df["price"].isna().sum() == 3


def test_parquet_source(tmp_path, tiny_events):
    src = tmp_path / "in.parquet"
    df = tiny_events.rename(columns={"user_id": "customer", "event": "kind"})
    df["kind"] = df["kind"].replace({"purchase": "order"})
    df.to_parquet(src)
    cfg = DataConfig(format="parquet", mapping={"user_id": "customer", "event": "kind"},
                     event_map={"order": "purchase"})
    r = ingest(tmp_path / "ws", [src], cfg, progress=False)
    assert r.accepted == len(df) and not r.rejected
    out = Workspace(tmp_path / "ws").connect().sql("SELECT * FROM events ORDER BY ts, user_id").df()
    assert (out["ts"].values == tiny_events.sort_values(["ts", "user_id"])["ts"].values).all()
    assert out["event"].value_counts().to_dict() == tiny_events["event"].value_counts().to_dict()


@pytest.mark.parametrize("ts_type,price_type", [("int64", "float64"), ("float64", "int64"), ("int32", "float32")])
def test_parquet_numbers_are_read_as_their_text_would_be(tmp_path, monkeypatch, ts_type, price_type):
    """A timestamp or price a Parquet file holds as a number is stored (or rejected) as the same rows
    written as text in a CSV; integer ids and extra columns are stored as their text."""
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "33" * 32)
    ts = [1_704_067_200, 1_704_067_200_123, 1_704_067_200_123_456, 1_704_067_201, None, 12, 1_704_067_202,
          1_704_067_203, 1_704_067_204, 1_704_067_205, 1_704_067_206]
    price = [9.5, 0.1 + 0.2, 1e-300, None, 3.0, 4.0, float("nan"), float("inf"), -2.5, 123456789.125, 7.0]
    if ts_type == "float64":  # fractional seconds
        ts = [None if t is None else t + 0.25 for t in ts]
    if price_type == "int64":
        price = [None if p is None or not math.isfinite(p) else int(p) for p in price]
    if ts_type == "int32":
        ts = [None if t is None else t % 2_000_000_000 for t in ts]
    n = len(ts)
    table = pa.table({"user_id": pa.array([f"u{i % 3}" for i in range(n)]),
                      "ts": pa.array(ts, getattr(pa, ts_type)()),
                      "event": pa.array(["view", "cart", "purchase"] * 3 + ["view", "buy"]),
                      "item_id": pa.array(range(100, 100 + n), pa.int64()),
                      "price": pa.array(price, getattr(pa, price_type)()),
                      "qty": pa.array(range(n), pa.int16())})
    pq.write_table(table, tmp_path / "in.parquet")
    text = pa.Table.from_arrays([c.cast(pa.string()) for c in table.columns], table.column_names)
    with open(tmp_path / "in.csv", "w", newline="") as f:  # the same rows as text (floats: shortest round trip)
        w = csv.writer(f)
        w.writerow(table.column_names)
        w.writerows(["" if v is None else v for v in row.values()] for row in text.to_pylist())
    stored = {}
    for fmt in ("parquet", "csv"):
        r = ingest(tmp_path / fmt, [tmp_path / f"in.{fmt}"], DataConfig(format=fmt, keep_extras=True), progress=False)
        rows = Workspace(tmp_path / fmt).connect().sql(
            "SELECT user_id, ts, event, item_id, price, session_id, raw_event, qty FROM events "
            "ORDER BY ts, item_id").fetchall()
        stored[fmt] = (r.accepted, r.rejected, r.filtered, r.files[0].unmapped, rows,
                       [(int(x["line"]) - (fmt == "csv"), x["reason"]) for x in _rejects(r.rejects_paths[0])])
    assert stored["parquet"] == stored["csv"]
    accepted, rejected, *_ = stored["parquet"]
    assert rejected.get("missing_ts") == 1 and rejected.get("implausible_ts", 0) >= 1
    assert (price_type == "int64") or (rejected.get("bad_price") == 2 and rejected.get("negative_price") == 1)
    assert accepted + sum(rejected.values()) == n


def test_parquet_number_ids_keep_every_row(tmp_path):
    """User ids a Parquet file holds as DOUBLE are pseudonymised by their text, a whole number's as the
    integer's: 0.0 and -0.0 (one number, two texts) are the user "0", 1.5 is "1.5", and every row is stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": pa.array([0.0, -0.0, 0.0, 1.5]), "ts": pa.array([1_704_067_200] * 4),
                             "event": pa.array(["view"] * 4)}), tmp_path / "in.parquet")
    r = ingest(tmp_path / "ws", [tmp_path / "in.parquet"], DataConfig(format="parquet"), progress=False)
    assert r.accepted == 4 and not r.rejected
    users = dict(Workspace(tmp_path / "ws").connect().sql("SELECT user_id, count(*) FROM events GROUP BY 1").fetchall())
    ids = pseudonym_for(tmp_path / "ws", ["0", "1.5"])
    assert users == {ids["0"]: 3, ids["1.5"]: 1}


def test_taobao_slices(tmp_path, shared_data):
    d = shared_data / "taobao_userbehavior"
    r = ingest(tmp_path, [d / "UserBehavior_head.csv.gz", d / "UserBehavior_tail.csv.gz"],
               DataConfig(format="taobao"), progress=False)
    head, tail = r.files
    assert (head.accepted, head.rejected, head.filtered) == (84_475, {"malformed_line": 1}, 0)
    assert (tail.accepted, tail.rejected) == (10_000, {})
    [row] = _rejects(r.rejects_paths[0])
    assert (int(row["line"]), row["reason"]) == (84_476, "malformed_line")
    assert row["raw"].endswith(",1968385,1875258,pv") and not row["raw"].startswith("100370,")
    con = Workspace(tmp_path).connect()
    counts = dict(con.sql("SELECT event, count(*) FROM events GROUP BY ALL").fetchall())
    assert counts == {"view": 75_872 + 9_046, "cart": 4_497 + 536, "wishlist": 2_356 + 212, "purchase": 1_750 + 206}
    assert con.sql("SELECT count(DISTINCT user_id) FROM events").fetchall()[0][0] == 815 + 114
    assert str(con.sql("SELECT min(ts) FROM events").fetchall()[0][0]) == "2017-09-11 08:16:39"


def test_otto_sample(tmp_path, shared_data):
    r = ingest(tmp_path, [shared_data / "otto_recsys_sample" / "train_first20sessions.jsonl"],
               DataConfig(format="otto"), progress=False)
    assert r.accepted == 862 and not r.rejected
    con = Workspace(tmp_path).connect()
    assert dict(con.sql("SELECT event, count(*) FROM events GROUP BY ALL").fetchall()) == {
        "view": 800, "cart": 52, "purchase": 10}
    assert con.sql("SELECT count(*) FROM events WHERE user_id <> session_id").fetchall()[0][0] == 0
    assert con.sql("SELECT count(DISTINCT user_id) FROM events").fetchall()[0][0] == 20
    lo, hi = con.sql("SELECT min(ts), max(ts) FROM events").fetchall()[0]
    assert str(lo).startswith("2022-07-31 22:00:00") and str(hi).startswith("2022-08-28 21:59:5")


def test_presets_retailrocket_rees46(tmp_path):
    rr = tmp_path / "events.csv"
    rr.write_text("timestamp,visitorid,event,itemid,transactionid\n1433221332117,257597,view,355908,\n"
                  "1433224214164,992329,addtocart,248676,\n1433221999827,111016,transaction,318965,4000\n")
    r = ingest(tmp_path / "ws", [rr], DataConfig(format="retailrocket", keep_extras=True), progress=False)
    assert r.accepted == 3
    df = Workspace(tmp_path / "ws").connect().sql("SELECT * FROM events ORDER BY ts").df()
    assert df["event"].tolist() == ["view", "purchase", "cart"] and df["transactionid"].tolist()[1] == "4000"
    assert str(df["ts"].iloc[0]) == "2015-06-02 05:02:12.117000"
    rees = tmp_path / "rees.csv"
    rees.write_text("event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
                    "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde\n"
                    "2019-10-01 00:00:04 UTC,remove_from_cart,3900821,2053013552326770905,"
                    "appliances.water_heater,aqua,33.20,554748717,9333dfbd\n")
    r = ingest(tmp_path / "ws", [rees], DataConfig(format="rees46", keep_extras=True), progress=False)
    assert r.accepted == 2
    df = Workspace(tmp_path / "ws").connect().sql("SELECT * FROM events WHERE brand IS NOT NULL ORDER BY ts").df()
    assert df["event"].tolist() == ["view", "remove_from_cart"]
    assert df["category_code"].iloc[1] == "appliances.water_heater"
    assert df["session_id"].str.len().tolist() == [32, 32] and df["price"].tolist() == [35.79, 33.2]


def test_idempotent(tmp_path):
    ws = Workspace(tmp_path)
    ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv"), progress=False)
    before = _snapshot(tmp_path)
    r = ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv"), progress=False)
    assert r.skipped == [str(DATA / "rejects.csv")] and r.accepted == 0
    assert _snapshot(tmp_path) == before
    copy = tmp_path.parent / "same_content.csv"
    copy.write_bytes((DATA / "rejects.csv").read_bytes())
    assert ingest(ws, [copy], DataConfig(format="csv"), progress=False).skipped == [str(copy)]
    # 5 known events and "teleport", stored as other
    assert ws.connect().sql("SELECT count(*) FROM events").fetchall()[0][0] == 6


@pytest.mark.parametrize("changed", [dict(event_map={"teleport": "view"}), dict(since="2024-01-01"),
                                     dict(mapping={"item_id": "category"}), dict(strict_events=True)])
def test_a_file_given_again_with_other_settings_is_refused_not_skipped(tmp_path, changed, capsys):
    """Skipping it would keep its events as read with the first settings, and the new ones would silently not
    apply; the refusal names what changed and leaves the workspace as it was."""
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv"), progress=False)
    before = _snapshot(tmp_path / "ws")
    with pytest.raises(ValueError, match="ingested into this workspace before with other settings") as e:
        ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv", **changed), progress=False)
    assert next(iter(changed)) in str(e.value) and "\n" not in str(e.value) and "--workspace NEW" in str(e.value)
    assert _snapshot(tmp_path / "ws") == before
    # the same reading written otherwise is the same file: skipped
    for same in (dict(mapping={"user_id": "user_id"}), dict(event_map={"view": "view"})):
        assert ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv", **same), progress=False).skipped
    ws2 = Workspace(tmp_path / "ws2")
    ingest(ws2, [DATA / "rejects.csv"], DataConfig(format="csv", since="2024-01-01"), progress=False)
    for since in ("2024-01-01T00:00:00Z", datetime(2024, 1, 1)):
        assert ingest(ws2, [DATA / "rejects.csv"], DataConfig(format="csv", since=since), progress=False).skipped
    # an entry of an older manifest records the format only: that is what is compared
    manifest = ws.read_manifest()
    del manifest["files"][0]["settings"], manifest["files"][0]["reader"]
    ev.atomic_write_json(ws.manifest_path, manifest)
    r = ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv", **changed), progress=False)
    assert r.skipped == [str(DATA / "rejects.csv")]
    capsys.readouterr()
    other = tmp_path / "other.csv"
    other.write_text("user_id,ts,event\nu9,2024-03-01T10:00:00Z,view\n")
    ingest(ws, [other], DataConfig(format="csv"))  # a new file beside one an earlier version read
    assert "read by an earlier version, which kept whole-number ids written as floats" in capsys.readouterr().err
    manifest = ws.read_manifest()
    assert [e.get("reader") for e in manifest["files"]] == [None, ev.READER]
    manifest["files"][0]["settings"] = manifest["files"][1]["settings"]  # as the reader before READER wrote it
    ev.atomic_write_json(ws.manifest_path, manifest)
    other.write_text("user_id,ts,event\nu9,2024-03-02T10:00:00Z,view\n")
    ingest(ws, [other], DataConfig(format="csv"))
    assert "in a text column ('1001.0'" in capsys.readouterr().err
    other.write_text("user_id,ts,event\nu9,2024-03-03T10:00:00Z,view\n")
    manifest = ws.read_manifest()
    manifest["files"][0]["reader"] = ev.READER
    ev.atomic_write_json(ws.manifest_path, manifest)
    ingest(ws, [other], DataConfig(format="csv"))
    assert "earlier version" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="format 'csv' then, 'jsonl' now"):
        ingest(ws, [DATA / "rejects.csv"], DataConfig(format="jsonl"), progress=False)


def test_an_export_that_grew_at_the_same_path_is_not_stored_twice(tmp_path):
    """Rows appended to a file ingested before: refused (its earlier rows would be stored twice), naming the bytes
    to ingest; those alone are then added. A file at the same path written over (the next day's export, even with
    a late event of the day before) is a new file."""
    log = tmp_path / "orders.csv"
    log.write_text("user_id,ts,event\nu1,2024-03-01T10:00:00Z,view\nu2,2024-03-02T10:00:00Z,purchase\n")
    size = log.stat().st_size
    ws = tmp_path / "ws"
    ingest(ws, [log], DataConfig(format="csv"), progress=False)
    with open(log, "a") as f:
        f.write("u3,2024-03-02T10:00:00Z,purchase\n")  # the same second as the last stored event
    with pytest.raises(ValueError, match=rf"has grown since it was ingested .* first {size:,} bytes .* "
                                         rf"tail -c \+{size + 1} "):
        ingest(ws, [log], DataConfig(format="csv"), progress=False)
    new = tmp_path / "new.csv"
    new.write_bytes(log.read_bytes()[:log.read_bytes().index(b"\n") + 1] + log.read_bytes()[size:])
    assert ingest(ws, [new], DataConfig(format="csv"), progress=False).accepted == 1
    log.write_text("user_id,ts,event\nu4,2024-03-02T09:00:00Z,view\nu4,2024-03-03T10:00:00Z,view\n")  # written over
    assert ingest(ws, [log], DataConfig(format="csv"), progress=False).accepted == 2
    assert Workspace(ws).connect().sql("SELECT count(*) FROM events").fetchall() == [(5,)]


def test_event_names_match_in_any_case(tmp_path):
    """'Purchase', 'VIEW' and an --event-map key in another case map as their exact names do; a name whose
    lower case two maps give different events matches exactly only."""
    src = tmp_path / "shop.csv"
    src.write_text("user_id,ts,event\n" + "".join(f"u1,2024-03-01T10:0{i}:00Z,{name}\n" for i, name in enumerate(
        ["Purchase", "VIEW", "view", "ORDER", "Click", "click", "CLICK", "ADD_TO_CART"])))
    cfg = DataConfig(format="csv", event_map={"order": "purchase", "Click": "view", "click": "other"})
    r = ingest(tmp_path / "ws", [src], cfg, progress=False)
    assert r.accepted == 8
    got = dict(Workspace(tmp_path / "ws").connect().sql("SELECT raw_event, event FROM events").fetchall())
    assert got == {"Purchase": "purchase", "VIEW": "view", "view": "view", "ORDER": "purchase", "Click": "view",
                   "click": "other", "CLICK": "other", "ADD_TO_CART": "other"}
    assert r.files[0].unmapped == {"ADD_TO_CART": 1, "CLICK": 1}


def float_id_logs(tmp_path, events):
    """The same log in Parquet twice: integer ids, and the ids as float64 (as pandas writes an integer column
    with a missing value), plus one row without a user."""
    df = events.assign(user_id=events["user_id"].str[1:].astype("int64"),
                       item_id=events["item_id"].str[1:].astype("int64") * 1_000_003)
    ints, floats = tmp_path / "ints.parquet", tmp_path / "floats.parquet"
    df.to_parquet(ints, index=False)
    extra = df.head(1).astype({"user_id": "float64"}).assign(user_id=float("nan"))
    pd.concat([df.astype({"user_id": "float64", "item_id": "float64"}), extra]).to_parquet(floats, index=False)
    return ints, floats


def test_whole_number_ids_of_a_float_column_are_named_as_integers(tmp_path, tiny_events, monkeypatch):
    """1001.0 is the user 1001 (the same pseudonym as from an integer column or a CSV), not '1001.0'."""
    monkeypatch.setenv(KEY_ENV, "ab" * 32)  # one key for both workspaces
    ints, floats = float_id_logs(tmp_path, tiny_events)
    a = ingest(tmp_path / "a", [ints], DataConfig(format="parquet"), progress=False)
    b = ingest(tmp_path / "b", [floats], DataConfig(format="parquet"), progress=False)
    assert b.accepted == a.accepted == len(tiny_events) and b.rejected == {"missing_user": 1}
    q = "SELECT user_id, item_id, ts FROM events ORDER BY ALL"
    a_rows, b_rows = (Workspace(tmp_path / w).connect().sql(q).fetchall() for w in ("a", "b"))
    assert a_rows == b_rows
    items = {r[0] for r in Workspace(tmp_path / "b").connect().sql("SELECT item_id FROM events").fetchall()}
    assert all("." not in i for i in items)
    assert pseudonym_for(tmp_path / "b", ["7"])["7"] in {r[0] for r in Workspace(tmp_path / "b").connect().sql(
        "SELECT user_id FROM events").fetchall()}


def test_whole_number_ids_written_as_floats_in_a_csv_are_the_integers(tmp_path, monkeypatch):
    """'13085.0' in a CSV (pandas' to_csv of an integer column with a missing value) is the user '13085' of
    another file; '1.5', '1.0e3', 'a.0', '1.' and '.0' are ids as written; 'NA', 'null', 'undefined', '\\N'
    are missing (a missing_user reject; no session)."""
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    ids = ["13085.0", " -7.00 ", "1.5", "1.0e3", "a.0", "1.", ".0", "12345678901234567890.0", "Nil", "Nan", "none"]
    a.write_text("user_id,ts,event,session_id\n" + "".join(
        f"{u},2024-03-01T10:{i:02d}:00Z,view,{u}\n" for i, u in enumerate(ids)))
    missing = ["NA", "null", "NULL", "None", "nan", "undefined", "\\N", "n/a", " NA "]
    b.write_text("user_id,ts,event,session_id\n13085,2024-03-02T10:00:00Z,purchase,13085\n" + "".join(
        f"{u},2024-03-02T11:00:00Z,view,NA\n" for u in missing) + "13085,2024-03-02T12:00:00Z,view,undefined\n")
    r = ingest(tmp_path / "ws", [a, b], DataConfig(format="csv"), progress=False)
    assert r.accepted == len(ids) + 2 and r.rejected == {"missing_user": len(missing)}
    assert Workspace(tmp_path / "ws").connect().sql(
        "SELECT count(*) FROM events WHERE session_id IS NULL").fetchall() == [(1,)]
    expect = ["13085", "-7", "1.5", "1.0e3", "a.0", "1.", ".0", "12345678901234567890", "Nil", "Nan", "none"]
    names = pseudonym_for(tmp_path / "ws", expect)
    stored = Workspace(tmp_path / "ws").connect().sql(
        "SELECT user_id, session_id, count(*) FROM events GROUP BY ALL").fetchall()
    assert sorted(stored, key=str) == sorted([(names[u], names[u], 2 if u == "13085" else 1) for u in expect]
                                             + [(names["13085"], None, 1)], key=str)
    # the key holder's look-ups read a raw id as ingest does
    assert pseudonym_for(tmp_path / "ws", [" 13085.0"])[" 13085.0"] == names["13085"]


def test_a_file_of_another_format_given_as_csv_is_named_so(tmp_path, tiny_events):
    """Parquet, JSON Lines or an empty file read as CSV: one line naming the --format, not a header error."""
    import gzip

    tiny_events.to_parquet(tmp_path / "log.parquet")
    (tmp_path / "log.jsonl").write_text('{"user_id": "u1", "ts": "2024-03-01T10:00:00Z", "event": "view"}\n')
    (tmp_path / "log.jsonl.gz").write_bytes(gzip.compress((tmp_path / "log.jsonl").read_bytes()))
    (tmp_path / "empty.csv").write_text("\n")
    import bz2
    import zipfile
    with zipfile.ZipFile(tmp_path / "log.csv.zip", "w") as z:  # a Kaggle download; an .xlsx is a zip too
        z.writestr("log.csv", "user_id,ts,event\nu1,2024-03-01T10:00:00Z,view\n")
    (tmp_path / "log.csv.bz2").write_bytes(bz2.compress(b"user_id,ts,event\n"))
    for name, what in [("log.parquet", "is a Parquet file, not CSV: use --format parquet"),
                       ("log.jsonl", "looks like JSON, not CSV: use --format jsonl"),
                       ("log.jsonl.gz", "looks like JSON"), ("empty.csv", "is empty"),
                       ("log.csv.zip", "is a zip archive .*, not CSV: unzip it"),
                       ("log.csv.bz2", "is bzip2-compressed")]:
        for fmt in ("csv", "taobao"):
            if fmt == "taobao" and name == "empty.csv":  # no header expected: an empty day is 0 rows
                assert ingest(tmp_path / "ws0", [tmp_path / name], DataConfig(format=fmt), progress=False).accepted == 0
                continue
            with pytest.raises(ValueError, match=what):
                ingest(tmp_path / "ws", [tmp_path / name], DataConfig(format=fmt), progress=False)
    assert not (tmp_path / "ws" / "events").exists() or not list((tmp_path / "ws" / "events").glob("*.parquet"))


def test_a_csv_without_a_header_line_is_named_so(tmp_path):
    """Yoochoose's clicks have no header: its first row is refused as one (it was taken for the column names and
    lost, uncounted); a header with a number among names is a header."""
    src = tmp_path / "yoochoose-clicks.dat"
    src.write_text("1,2014-04-01T13:45:01.000Z,214536508,2\n1,2014-04-01T13:46:01.000Z,214536509,S\n")
    with pytest.raises(ValueError, match="the first line is a row of data .*, not a header .* sed -i '1i"):
        ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    for first in ("12/1/2009 7:45;13085.0;3.5", "42,2024-01-01"):
        (tmp_path / "x.csv").write_text(first + "\n")
        with pytest.raises(ValueError, match="row of data"):
            ingest(tmp_path / "ws", [tmp_path / "x.csv"], DataConfig(format="csv"), progress=False)
    ok = tmp_path / "ok.csv"
    ok.write_text("user_id,ts,event,2024\nu1,2024-03-01T10:00:00Z,view,1\n")
    assert ingest(tmp_path / "ws", [ok], DataConfig(format="csv"), progress=False).accepted == 1
    numbered = tmp_path / "numbered.csv"  # pandas' to_csv after read_csv(header=None): columns named 0, 1, 2
    numbered.write_text("0,1,2\nu1,2024-03-01T10:00:00Z,view\n")
    cfg = DataConfig(format="csv", mapping={"user_id": "0", "ts": "1", "event": "2"})
    assert ingest(tmp_path / "ws2", [numbered], cfg, progress=False).accepted == 1
    with pytest.raises(ValueError) as e:
        ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert "214536508" not in str(e.value)  # the row's values (ids) are not shown


def test_a_bad_time_window_is_refused_naming_the_flag(tmp_path):
    for cfg, what in [(DataConfig(since="yesterday"), "--since 'yesterday' is not a time"),
                      (DataConfig(until="2024-13-01"), "--until '2024-13-01' is not a time"),
                      (DataConfig(since="2024-03-02", until="2024-03-01"), "is not before --until")]:
        with pytest.raises(ValueError, match=what):
            ingest(tmp_path / "ws", [DATA / "rejects.csv"], cfg, progress=False)
    assert not (tmp_path / "ws").exists()


def test_lines_that_are_not_utf8_are_rejected_as_such(tmp_path):
    """A cp1252 export's accented rows: rejected as not_utf8 (not malformed_line), kept, and the summary says
    how to convert the file."""
    src = tmp_path / "cp1252.csv"
    src.write_bytes("user_id,ts,event,category\nu1,2024-03-01T10:00:00Z,view,Books\n"
                    "u1,2024-03-01T10:01:00Z,view,Bücher\nu2,2024-03-01T10:02:00Z,purchase,Café\n".encode("cp1252"))
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert r.accepted == 1 and r.rejected == {"not_utf8": 2}
    assert [(int(row["line"]), row["reason"]) for row in _rejects(r.rejects_paths[0])] == [(3, "not_utf8"),
                                                                                         (4, "not_utf8")]
    assert "iconv" in r.summary()
    # the bad byte right before the delimiter: the raw line keeps its fields, the user id is pseudonymised
    src2 = tmp_path / "cp1252_first.csv"
    src2.write_bytes("event,user_id,ts\ncafé,bob_secret,2024-03-01T10:00:00Z\nview,u9,2024-03-01T10:01:00Z\n"
                     .encode("cp1252"))
    r2 = ingest(tmp_path / "ws2", [src2], DataConfig(format="csv"), progress=False)
    (row,) = _rejects(r2.rejects_paths[0])
    fields = row["raw"].split(",")
    assert row["reason"] == "not_utf8" and len(fields) == 3 and "bob_secret" not in row["raw"]
    assert fields[1] == pseudonym_for(tmp_path / "ws2", ["bob_secret"])["bob_secret"]


def test_prices_with_a_currency_or_a_decimal_comma_are_read(tmp_path):
    """A European export: ';'-separated, decimal commas, thousands dots, currency symbols and codes."""
    prices = {"12,50": 12.5, "€9.99": 9.99, "1.234,00": 1234.0, "1,234.50": 1234.5, "EUR 12,5": 12.5,
              "12,50 zł": 12.5, "$1,234": 1234.0, "3.5": 3.5, "1.234": 1.234, "0,0508": 0.0508, "12,5083": 12.5083,
              "1 234,56": 1234.56, "1\u00a0234,56 €": 1234.56, "1\u202f234 567,8": 1234567.8}
    src = tmp_path / "eu.csv"
    rows = "".join(f"u{i};2024-03-01T10:{i:02d}:00Z;view;{p}\n" for i, p in enumerate([*prices, "12..5", "abc",
                                                                                       "12 50"]))
    src.write_text("user_id;ts;event;price\n" + rows, encoding="utf-8")
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert r.accepted == len(prices) and r.rejected == {"bad_price": 3}
    got = [p for (p,) in Workspace(tmp_path / "ws").connect().sql("SELECT price FROM events ORDER BY ts").fetchall()]
    assert got == pytest.approx(list(prices.values()))


@pytest.mark.parametrize("gz", [False, True])
def test_reject_lines_are_physical_lines_after_quoted_newlines_and_blank_lines(tmp_path, gz):
    import gzip

    text = ('user_id,ts,event,category\nu1,2024-03-01T10:00:00Z,view,"a\nb\nc"\n\nu2,notatime,view,x\n'
            'u3,2024-03-01T10:00:00Z,view,"d\ne"\nu4,2024-03-01T10:00:00Z,view,x,EXTRA\nu5,,view,y\n')
    src = tmp_path / ("log.csv.gz" if gz else "log.csv")
    src.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert r.accepted == 2
    got = [(int(row["line"]), row["reason"]) for row in _rejects(r.rejects_paths[0])]
    assert got == [(6, "bad_ts"), (9, "malformed_line"), (10, "missing_ts")]


def test_dates_written_yyyymmdd_are_dates(tmp_path):
    """CDNOW-style dates (19970101) as text or as Parquet integers: that day, not August 1970 (which would be
    implausible_ts); an impossible date is a bad_ts; an explicit --ts-unit s keeps the epoch reading."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "cd.csv"
    src.write_text("user_id,ts,event\nu1,19970101,purchase\nu2,19970230,purchase\nu3,1704067200,view\n")
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert r.accepted == 2 and r.rejected == {"bad_ts": 1}
    got = [str(t) for (t,) in Workspace(tmp_path / "ws").connect().sql("SELECT ts FROM events ORDER BY ts").fetchall()]
    assert got == ["1997-01-01 00:00:00", "2024-01-01 00:00:00"]
    pq.write_table(pa.table({"user_id": ["u1"], "ts": pa.array([19971231], pa.int64()), "event": ["purchase"]}),
                   tmp_path / "cd.parquet")
    ingest(tmp_path / "ws2", [tmp_path / "cd.parquet"], DataConfig(format="parquet"), progress=False)
    (ts,), = Workspace(tmp_path / "ws2").connect().sql("SELECT ts FROM events").fetchall()
    assert str(ts) == "1997-12-31 00:00:00"
    r3 = ingest(tmp_path / "ws3", [src], DataConfig(format="csv", ts_unit="s"), progress=False)
    assert r3.rejected == {"implausible_ts": 2}


def test_times_without_a_zone_are_read_in_ts_zone(tmp_path):
    """JData-style local times: --ts-zone Asia/Shanghai stores 10:00 as 02:00 UTC; a time with an offset and an
    epoch number keep their meaning; a Parquet TIMESTAMP without zone is read in it too; a bad zone is one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "local.csv"
    src.write_text("user_id,ts,event\nu1,2024-03-01 10:00:00,view\nu2,2024-03-01T10:00:00+01:00,view\n"
                   "u3,1709287200,view\n")
    cfg = DataConfig(format="csv", ts_zone="Asia/Shanghai")
    ingest(tmp_path / "ws", [src], cfg, progress=False)
    got = [str(t) for (t,) in Workspace(tmp_path / "ws").connect().sql("SELECT ts FROM events ORDER BY ts").fetchall()]
    assert got == ["2024-03-01 02:00:00", "2024-03-01 09:00:00", "2024-03-01 10:00:00"]
    pq.write_table(pa.table({"user_id": ["u1"], "ts": pa.array([datetime(2024, 3, 1, 10)], pa.timestamp("us")),
                             "event": ["view"]}), tmp_path / "local.parquet")
    ingest(tmp_path / "ws2", [tmp_path / "local.parquet"], dataclasses.replace(cfg, format="parquet"), progress=False)
    (ts,), = Workspace(tmp_path / "ws2").connect().sql("SELECT ts FROM events").fetchall()
    assert str(ts) == "2024-03-01 02:00:00"
    for bad in ("Mars/Olympus", "localtime"):  # the second: Python knows it, DuckDB does not
        with pytest.raises(ValueError, match=f"--ts-zone '{bad}' is not a time zone"):
            ingest(tmp_path / "ws3", [src], DataConfig(format="csv", ts_zone=bad), progress=False)
    # build's day cutoffs follow the zone the events were read in; a YYYYMMDD date is midnight there too
    from purchase_intent.prepare import resolve_time_zone
    assert resolve_time_zone(Workspace(tmp_path / "ws"), None) == "Asia/Shanghai"
    day = tmp_path / "day.csv"
    day.write_text("user_id,ts,event\nu1,19970101,view\n")
    ingest(tmp_path / "ws4", [day], cfg, progress=False)
    (ts,), = Workspace(tmp_path / "ws4").connect().sql("SELECT ts FROM events").fetchall()
    assert str(ts) == "1996-12-31 16:00:00"


def test_time_layouts_shops_export(tmp_path):
    """An offset after a space (Shopify's '2024-01-14 06:24:36 +0100'), epoch nanoseconds (detected, or
    --ts-unit ns), and --ts-format for a layout ISO does not cover (UCI Online Retail's '1/4/2010 14:28', read
    in --ts-zone); a layout DuckDB cannot read is one line before any file is read."""
    def stored(ws):
        return [str(t) for (t,) in Workspace(ws).connect().sql("SELECT ts FROM events ORDER BY ts").fetchall()]

    src = tmp_path / "shop.csv"
    src.write_text("user_id,ts,event\nu1,2024-01-14 06:24:36 +0100,purchase\nu2,2024-01-14 06:24:36 -0500,view\n"
                   "u3,1433221332117000000,view\n")
    assert ingest(tmp_path / "a", [src], DataConfig(format="csv"), progress=False).accepted == 3
    assert stored(tmp_path / "a") == ["2015-06-02 05:02:12.117000", "2024-01-14 05:24:36", "2024-01-14 11:24:36"]
    ns = tmp_path / "ns.csv"
    ns.write_text("user_id,ts,event\nu1,1433221332117000000,view\n")
    ingest(tmp_path / "b", [ns], DataConfig(format="csv", ts_unit="ns"), progress=False)
    assert stored(tmp_path / "b") == ["2015-06-02 05:02:12.117000"]
    us = tmp_path / "us.csv"
    us.write_text("user_id,ts,event\nu1,1/4/2010 14:28,purchase\nu2,7/31/2010 8:05,purchase\n")
    cfg = DataConfig(format="csv", ts_format="%m/%d/%Y %H:%M", ts_zone="Europe/London")
    assert ingest(tmp_path / "c", [us], cfg, progress=False).accepted == 2
    assert stored(tmp_path / "c") == ["2010-01-04 14:28:00", "2010-07-31 07:05:00"]
    with pytest.raises(ValueError, match="--ts-format '%Q' is not a strptime layout"):
        ingest(tmp_path / "d", [us], DataConfig(format="csv", ts_format="%Q"), progress=False)
    assert not (tmp_path / "d").exists()


def test_an_ingest_that_accepts_no_row_stores_nothing_and_shows_the_values(tmp_path):
    """Every row rejected (a time layout the reader does not know): an error with the counts and a few of the
    values, nothing stored, so the same file is read again with --ts-format in the same workspace. Ids are never
    among the values shown."""
    us = tmp_path / "us.csv"
    us.write_text("user_id,ts,event,price\n" + "".join(
        f"secret-user-{i},1/{i + 1}/2010 14:28,purchase,{i}\n" for i in range(9)) + "secret-user-x,,view,1\n")
    ws = tmp_path / "ws"
    with pytest.raises(ev.IngestNothingAcceptedError) as e:
        ingest(ws, [us], DataConfig(format="csv"), progress=False)
    msg = str(e.value)
    assert msg.startswith("no row was accepted, nothing was stored")
    assert "bad_ts" in msg and "values shaped '9/9/9999 99:99'" in msg and "--ts-format" in msg
    assert "secret-user" not in msg and "rejects:" not in msg
    assert not Workspace(ws).read_manifest().get("files") and not list((ws / "events").glob("*.parquet"))
    assert not (ws / "rejects").exists() or not list((ws / "rejects").iterdir())
    r = ingest(ws, [us], DataConfig(format="csv", ts_format="%m/%d/%Y %H:%M"), progress=False)
    assert r.accepted == 9 and r.rejected == {"missing_ts": 1}
    # a file with some rows accepted is stored as before, a hint shown only where most rows fail
    assert "(bad_ts" not in r.summary()
    # every row rejected for what is no misreading (no user in any row): stored as the empty load it is
    anon = tmp_path / "anon.csv"
    anon.write_text("user_id,ts,event\nNA,2024-03-01T10:00:00Z,view\n,2024-03-01T11:00:00Z,view\n")
    r = ingest(ws, [anon], DataConfig(format="csv"), progress=False)
    assert (r.accepted, r.rejected) == (0, {"missing_user": 2})


def test_a_transactions_only_log_takes_all_events(tmp_path):
    """No event column (CDNOW): the error names --all-events; with it every row is that event; with an event
    column as well it is refused; a file separated by spaces is named so."""
    src = tmp_path / "tx.csv"
    src.write_text("customer_id,date,dollar_value\n00001,19970101,11.77\n00002,19970112,12.00\n")
    cols = {"user_id": "customer_id", "ts": "date", "price": "dollar_value"}
    with pytest.raises(ValueError, match="--all-events purchase"):
        ingest(tmp_path / "ws", [src], DataConfig(format="csv", mapping=cols), progress=False)
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv", mapping=cols, all_events="purchase"), progress=False)
    assert r.accepted == 2
    assert Workspace(tmp_path / "ws").connect().sql("SELECT DISTINCT event FROM events").fetchall() == [("purchase",)]
    with pytest.raises(ValueError, match="is not a canonical event"):
        ingest(tmp_path / "ws2", [src], DataConfig(format="csv", mapping=cols, all_events="buy"), progress=False)
    with pytest.raises(ValueError, match="leave one of them out"):
        ingest(tmp_path / "ws2", [DATA / "rejects.csv"], DataConfig(format="csv", all_events="view"), progress=False)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text(" customer_id  date  dollar_value\n 00001  19970101  11.77\n")
    with pytest.raises(ValueError, match="a file separated by spaces is not read"):
        ingest(tmp_path / "ws3", [spaced], DataConfig(format="csv", mapping=cols), progress=False)


def test_extra_columns_are_stored_only_when_asked(tmp_path):
    """A column no map names (an e-mail address) is not stored unless --keep-extras: no model reads it, and it
    may identify people."""
    src = tmp_path / "log.csv"
    src.write_text("user_id,ts,event,email,Device Type\nu1,2024-03-01T10:00:00Z,view,jane@example.com,phone\n")
    ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    cols = Workspace(tmp_path / "ws").connect().sql("SELECT * FROM events").columns
    assert "email" not in cols and "device_type" not in cols
    assert not any(b"jane@example.com" in p.read_bytes() for p in (tmp_path / "ws").rglob("*") if p.is_file())
    ingest(tmp_path / "ws2", [src], DataConfig(format="csv", keep_extras=True), progress=False)
    assert Workspace(tmp_path / "ws2").connect().sql("SELECT email, device_type FROM events").fetchall() == [
        ("jane@example.com", "phone")]
    with pytest.raises(ValueError, match="keep_extras False then, True now"):  # another reading of a known file
        ingest(tmp_path / "ws", [src], DataConfig(format="csv", keep_extras=True), progress=False)


def test_excel_sep_line_and_a_pandas_index_column(tmp_path):
    """Excel's 'sep=;' first line names the delimiter (line numbers count it); pandas' unnamed index column is
    kept as the extra column unnamed_0; another unnamed column is still refused."""
    excel = tmp_path / "excel.csv"
    excel.write_text("sep=;\nuser_id;ts;event;price\nu1;2024-03-01T10:00:00Z;view;12,50\nu2;bad;view;3\n")
    r = ingest(tmp_path / "ws", [excel], DataConfig(format="csv"), progress=False)
    assert r.accepted == 1 and [(int(x["line"]), x["reason"]) for x in _rejects(r.rejects_paths[0])] == [(4, "bad_ts")]
    pdidx = tmp_path / "pandas.csv"
    pdidx.write_text(",user_id,ts,event\n0,u1,2024-03-01T10:00:00Z,view\n1,u2,2024-03-01T11:00:00Z,purchase\n")
    assert ingest(tmp_path / "ws2", [pdidx], DataConfig(format="csv", keep_extras=True), progress=False).accepted == 2
    got = Workspace(tmp_path / "ws2").connect().sql("SELECT unnamed_0 FROM events ORDER BY ts").fetchall()
    assert got == [("0",), ("1",)]
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,,event\nu1,2024-03-01T10:00:00Z,view\n")
    with pytest.raises(ValueError, match="give every column its own name"):
        ingest(tmp_path / "ws3", [bad], DataConfig(format="csv"), progress=False)


def test_a_field_longer_than_pythons_csv_reads_keeps_ingest_going(tmp_path):
    """A 200 KB field, a blank line and a bad row: the line numbers fall back to record numbers, no traceback."""
    src = tmp_path / "long.csv"
    src.write_text("user_id,ts,event,note\nu1,2024-03-01T10:00:00Z,view," + "x" * 200_000 + "\n\n"
                   "u2,bad,view,y\n")
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert r.accepted == 1 and r.rejected == {"bad_ts": 1} and len(_rejects(r.rejects_paths[0])) == 1


def test_a_crlf_file_with_a_quoted_newline_and_a_malformed_row_keeps_its_good_rows(tmp_path):
    """DuckDB reports a CRLF file's malformed record with a leading line break; that is not a record swallowing
    the next line, so the file is not read line by line (which would reject the quoted newline's row)."""
    src = tmp_path / "crlf.csv"
    src.write_bytes(b'user_id,ts,event,note\r\nu1,2024-03-01T10:00:00Z,view,"a\r\nb"\r\n'
                    b"u2,2024-03-01T10:01:00Z,view,x,EXTRA\r\nu3,2024-03-01T10:02:00Z,view,y\r\n")
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    assert r.accepted == 2 and r.rejected == {"malformed_line": 1}
    assert [(int(x["line"]), x["reason"]) for x in _rejects(r.rejects_paths[0])] == [(4, "malformed_line")]


def test_since_until_filtered(tmp_path, tiny_events):
    src = tmp_path / "in.csv"
    tiny_events.to_csv(src, index=False)
    cfg = DataConfig(format="csv", since="2024-03-05", until="2024-03-10T00:00:00+00:00")
    r = ingest(tmp_path / "ws", [src], cfg, progress=False)
    inside = ((tiny_events["ts"] >= "2024-03-05") & (tiny_events["ts"] < "2024-03-10")).sum()
    assert r.accepted == inside and r.filtered == len(tiny_events) - inside and not r.rejected
    assert r.files[0].rows_read == len(tiny_events)


def test_strict_stores_nothing(tmp_path):
    ws = Workspace(tmp_path)
    ingest(ws, [DATA / "mapped.jsonl"], JSONL_CFG, progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(IngestRejectedError) as e:
        ingest(ws, [DATA / "rejects.csv"], DataConfig(format="csv", strict=True), progress=False)
    assert e.value.report.rejected["malformed_line"] == 2
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["atomic_write_json", "_fsync_file"])
def test_failure_midway_leaves_workspace_unchanged(tmp_path, monkeypatch, target):
    ws = Workspace(tmp_path)
    ingest(ws, [DATA / "mapped.jsonl"], JSONL_CFG, progress=False)
    before = _snapshot(tmp_path)
    calls = []

    def boom(*a, **k):
        calls.append(a)
        if len(calls) == 2 or target == "atomic_write_json":
            raise OSError("disk full")
        return real(*a, **k)

    real = getattr(ev, target)
    monkeypatch.setattr(ev, target, boom)
    src2 = tmp_path.parent / "other.csv"
    src2.write_text("user_id,ts,event\nzed,2024-01-01T00:00:00Z,view\n")
    with pytest.raises(ev.IngestWriteError, match="ingest stopped, nothing was stored: disk full"):
        ingest(ws, [DATA / "rejects.csv", src2], DataConfig(format="csv"), progress=False)
    assert _snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    r = ingest(ws, [DATA / "rejects.csv", src2], DataConfig(format="csv"), progress=False)
    assert r.accepted == 6 + 1  # with "teleport", stored as other


def test_sigkill_leaves_workspace_unchanged(tmp_path, tiny_events):
    ws = Workspace(tmp_path / "ws")
    ingest(ws, [DATA / "mapped.jsonl"], JSONL_CFG, progress=False)
    before = _snapshot(ws.root)
    src = tmp_path / "in.csv"
    tiny_events.to_csv(src, index=False)
    # the child stops right before the commit (parts already moved in, manifest not yet replaced)
    script = textwrap.dedent(f"""
        import sys, time
        from purchase_intent import events as ev
        from purchase_intent.config import DataConfig
        def stop(d):
            print("READY", flush=True); time.sleep(60)
        ev.fsync_dir = stop
        ev.ingest({str(ws.root)!r}, [{str(src)!r}], DataConfig(format="csv"), progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        assert list(ws.events_dir.glob("part-*.parquet")) != []  # the new part is there, uncommitted
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert ws.manifest_path.read_bytes() == before["events/manifest.json"]
    assert ws.connect().sql("SELECT count(*) FROM events").fetchall()[0][0] == 4
    r = ingest(ws, [src], DataConfig(format="csv"), progress=False)  # next ingest cleans up and works
    assert r.accepted == len(tiny_events)
    after = _snapshot(ws.root)
    assert {k: v for k, v in after.items() if k in before and k != "events/manifest.json"} == \
        {k: v for k, v in before.items() if k != "events/manifest.json"}
    assert len(list(ws.events_dir.glob("part-*.parquet"))) == 2
    assert not [p for p in ws.root.rglob("*") if p.name.startswith(".tmp-")]


def test_csv_line_numbers_follow_file_order(tmp_path):
    # a larger plain CSV, read in parallel: semantic rejects after malformed lines keep exact lines
    n = 60_000
    lines = ["user_id,ts,event,price"]
    expected = {}
    for i in range(2, n + 2):
        if i % 9_973 == 0:
            lines.append(f"u{i},1709287200")  # malformed
            expected[i] = "malformed_line"
        elif i % 7_919 == 0:
            lines.append(f"u{i},1709287200,view,-1")
            expected[i] = "negative_price"
        else:
            lines.append(f"u{i},1709287200,view,{i % 50}")
    src = tmp_path / "big.csv"
    src.write_text("\n".join(lines) + "\n")
    r = ingest(tmp_path / "ws", [src], DataConfig(format="csv"), progress=False)
    got = {int(x["line"]): x["reason"] for x in _rejects(r.rejects_paths[0])}
    assert got == expected and r.accepted == n - len(expected)


def test_unknown_mapping_errors(tmp_path):
    with pytest.raises(ValueError, match="not in the file"):
        ingest(tmp_path, [DATA / "rejects.csv"], DataConfig(format="csv", mapping={"user_id": "nope"}), progress=False)
    with pytest.raises(ValueError, match="unknown format"):
        ingest(tmp_path, [DATA / "rejects.csv"], DataConfig(format="xml"), progress=False)
    assert not Workspace(tmp_path).manifest_path.exists()


def test_key_change_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "11" * 32)
    ingest(tmp_path, [DATA / "mapped.jsonl"], JSONL_CFG, progress=False)
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "22" * 32)
    with pytest.raises(ValueError, match="key differs"):
        ingest(tmp_path, [DATA / "rejects.csv"], DataConfig(format="csv"), progress=False)


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_sessions_pseudonymised_per_row_equal_the_session_map(tmp_path, monkeypatch, tiny_events, fmt, chain):
    """A log whose session map would not fit in memory has its session ids pseudonymised row by row in
    SQL: the same events, pseudonyms and rejects files as through the map (also under a rotated key chain)."""
    from purchase_intent.privacy import KEY_ENV
    monkeypatch.setenv(KEY_ENV, "11" * 32 + ("\n" + "22" * 32 if chain else ""))
    if fmt == "csv":
        src, cfg = DATA / "rejects.csv", DataConfig(format="csv", since="2024-01-01", strict_events=True)
    else:
        src, cfg = tmp_path / "in.parquet", DataConfig(format="parquet")
        tiny_events.assign(session_id=tiny_events["user_id"] + "-s" + (tiny_events.index % 3).astype(str)
                           ).to_parquet(src)
    out = {}
    for per_row in (False, True):
        if per_row:  # every session map "too large"
            monkeypatch.setattr(ev, "MAP_ROW_BYTES", 2 ** 60)
        assert ev.sessions_per_row(1) == per_row
        ws = tmp_path / f"ws-{per_row}"
        r = ingest(ws, [src], cfg, progress=False)
        events = Workspace(ws).connect().sql("SELECT * FROM events ORDER BY ALL").df()
        assert events["session_id"].notna().any()
        out[per_row] = (events, r.rejects_paths[0].read_text() if r.rejects_paths else None)
    assert out[True][0].equals(out[False][0])
    assert out[True][1] == out[False][1] and (out[True][1] is not None) == (fmt == "csv")


def test_a_folder_is_read_with_its_sub_folders_in_path_order(tmp_path):
    """Segment's S3 archive keeps an hour per file in a folder per day: every file is read, by its path; _SUCCESS
    and hidden files are not."""
    root = tmp_path / "segment-logs" / "src1"
    for day, users in (("2024-03-02", ["u3"]), ("2024-03-01", ["u1", "u2"])):
        (root / day).mkdir(parents=True)
        for i, u in enumerate(users):
            (root / day / f"{i}.csv").write_text(f"user_id,ts,event\n{u},{day}T10:0{i}:00Z,view\n")
    (root / "_SUCCESS").write_text("")
    (root / "2024-03-01" / ".0.csv.crc").write_text("x")
    r = ingest(tmp_path / "ws", [tmp_path / "segment-logs"], DataConfig(format="csv"), progress=False)
    assert r.accepted == 3 and [Path(f.source).name for f in r.files] == ["0.csv", "1.csv", "0.csv"]
    assert [Path(f.source).parent.name for f in r.files] == ["2024-03-01", "2024-03-01", "2024-03-02"]
