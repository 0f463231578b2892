"""`--format ga4`: the GA4 BigQuery export (Parquet and NDJSON, a file or a folder) ingested as canonical events."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ga4_fixture import SCHEMA, ga4_rows, write_ga4

from purchase_intent.cli import main
from purchase_intent.config import DataConfig
from purchase_intent.events import ingest
from purchase_intent.workspace import Workspace

GA4 = DataConfig(format="ga4")
KEY = "ga4-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return ga4_rows(users=120, days=10, seed=3)


def _events(ws: Path):
    return Workspace(ws).connect().sql("SELECT * EXCLUDE (user_id, session_id), user_id, session_id FROM events "
                                       "ORDER BY ts, raw_event, item_id, user_id").df()


def _rejects(report) -> list[dict]:
    with open(report.rejects_paths[0], newline="") as f:
        return list(csv.DictReader(f))


def _row(**over) -> dict:
    """One export row of the published schema (a view_item of one item), fields overridden."""
    base = {"event_date": "20240301", "event_timestamp": 1709287200000000, "event_name": "view_item",
            "event_params": [{"key": "ga_session_id", "value": {"int_value": 1709287100}},
                             {"key": "page_title", "value": {"string_value": "Shoes"}}],
            "user_id": None, "user_pseudo_id": "123.456",
            "items": [{"item_id": "SKU_1", "item_name": "Shoe", "item_category": "Shoes", "price": 49.5,
                       "quantity": 1}]}
    return {**base, **over}


def _ndjson(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parquet_and_ndjson_folders_give_the_same_events(rows, tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    write_ga4(rows, tmp_path / "pq", "parquet")
    write_ga4(rows, tmp_path / "js", "ndjson")
    r1 = ingest(tmp_path / "w1", [tmp_path / "pq"], GA4, progress=False)
    r2 = ingest(tmp_path / "w2", [tmp_path / "js"], GA4, progress=False)
    assert len(r1.files) == len(list((tmp_path / "pq").iterdir())) > 1  # one file per day
    assert r1.accepted == r2.accepted == len(rows) and not r1.rejected and not r2.rejected
    a, b = _events(tmp_path / "w1"), _events(tmp_path / "w2")
    assert a.equals(b)
    # the default event map: GA4's recommended e-commerce events; the rest are other, raw name kept
    pairs = set(zip(a["raw_event"], a["event"]))
    assert {("view_item", "view"), ("add_to_cart", "cart"), ("remove_from_cart", "remove_from_cart"),
            ("add_to_wishlist", "wishlist"), ("begin_checkout", "checkout"), ("add_shipping_info", "checkout"),
            ("add_payment_info", "checkout"), ("purchase", "purchase"), ("page_view", "other"),
            ("session_start", "other")} <= pairs
    assert set(r1.unmapped) == {"page_view", "session_start", "user_engagement"}
    assert r1.unmapped["page_view"] == int((a["raw_event"] == "page_view").sum())
    assert "as other" in r1.summary() and "page_view" in r1.summary()
    # items: id, category and price of the item; sessions from ga_session_id
    views = a[a["event"] == "view"]
    assert views["item_id"].str.startswith("SKU_").all() and views["category"].str.startswith("Category ").all()
    assert views["price"].notna().all() and a["session_id"].notna().all()
    assert a[a["event"] == "other"]["item_id"].isna().all()
    manifest = Workspace(tmp_path / "w1").read_manifest()
    assert manifest["files"][0]["unmapped_events"]


def test_one_event_per_item_session_per_user_and_user_id_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    items = [{"item_id": f"SKU_{i}", "item_category": "Shoes", "price": 10.0 * i, "quantity": 1} for i in (1, 2, 3)]
    src = [_row(event_name="purchase", items=items, user_id="member-7"),
           _row(event_timestamp="1709287300000000", event_name="page_view", items=[], user_pseudo_id="999.1"),
           _row(event_timestamp=1709287400000000, event_name="scroll")]  # no items key at all below
    del src[2]["items"]
    r = ingest(tmp_path / "ws", [_ndjson(tmp_path / "events_20240301.json", src)], GA4, progress=False)
    assert r.accepted == 5 and not r.rejected
    df = _events(tmp_path / "ws")
    bought = df[df["event"] == "purchase"]
    assert sorted(bought["item_id"]) == ["SKU_1", "SKU_2", "SKU_3"] and sorted(bought["price"]) == [10, 20, 30]
    assert bought["user_id"].nunique() == 1 and bought["ts"].nunique() == 1
    # user_id when set (member-7), else user_pseudo_id: three users
    assert df["user_id"].nunique() == 3
    # ga_session_id is unique per user only: three users with the same ga_session_id have three sessions
    assert df["session_id"].nunique() == 3
    assert str(df["ts"].iloc[0]) == "2024-03-01 10:00:00"  # event_timestamp in microseconds


def test_bad_rows_are_rejects_with_reasons_not_crashes(tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", KEY)
    src = [_row(),
           _row(user_pseudo_id=None, user_id=""),  # no user
           _row(event_timestamp="yesterday"),  # unparseable timestamp
           _row(items="SKU_1"),  # items is a string
           _row(event_params={"key": "ga_session_id"}),  # event_params is no list
           _row(items=["SKU_1"]),  # an item that is no struct
           _row(event_params=[{"key": "ga_session_id", "value": {"int_value": {"x": 1}}}]),
           _row(user_pseudo_id={"id": 1}),
           "{not json",
           _row(items=[{"item_id": "SKU_9", "price": "cheap"}]),
           _row(event_name=None)]
    r = ingest(tmp_path / "ws", [_ndjson(tmp_path / "events_20240301.json", src)], GA4, progress=False)
    assert r.accepted == 1
    assert r.rejected == {"bad_field_type": 5, "missing_user": 1, "bad_ts": 1, "malformed_line": 1,
                          "bad_price": 1, "unknown_event": 1}
    got = [(int(x["line"]), x["reason"]) for x in _rejects(r)]
    assert got == [(2, "missing_user"), (3, "bad_ts"), (4, "bad_field_type"), (5, "bad_field_type"),
                   (6, "bad_field_type"), (7, "bad_field_type"), (8, "bad_field_type"), (9, "malformed_line"),
                   (10, "bad_price"), (11, "unknown_event")]
    assert "123.456" not in r.rejects_paths[0].read_text()  # raw pseudo ids are pseudonymised in rejects


def test_parquet_column_of_the_wrong_type_is_rejected(tmp_path):
    schema = pa.schema([f if f.name != "items" else pa.field("items", pa.string()) for f in SCHEMA])
    row = {**{f.name: None for f in SCHEMA}, "event_date": "20240301", "event_timestamp": 1709287200000000,
           "event_name": "view_item", "user_pseudo_id": "1.2", "items": "SKU_1"}
    pq.write_table(pa.Table.from_pylist([row, {**row, "items": None}], schema=schema), tmp_path / "events_20240301")
    r = ingest(tmp_path / "ws", [tmp_path / "events_20240301"], GA4, progress=False)
    assert r.rejected == {"bad_field_type": 1} and r.accepted == 1


def test_strict_events_rejects_unmapped_names(tmp_path):
    path = _ndjson(tmp_path / "events_20240301.json", [_row(), _row(event_name="page_view")])
    r = ingest(tmp_path / "ws", [path], DataConfig(format="ga4", strict_events=True), progress=False)
    assert r.accepted == 1 and r.rejected == {"unknown_event": 1} and not r.unmapped
    r = ingest(tmp_path / "ws2", [path], DataConfig(format="ga4", event_map={"page_view": "view"}), progress=False)
    assert r.accepted == 2 and not r.unmapped


def test_run_session_task_on_a_ga4_export_without_any_map(rows, tmp_path, capsys):
    """The issue's goal: a GA4 export through `run --format ga4 --task session`, no --map, no --event-map."""
    write_ga4(ga4_rows(users=500, days=21, seed=5), tmp_path / "export", "parquet")
    ws = tmp_path / "ws"
    rc = main(["--workspace", str(ws), "run", "--data", str(tmp_path / "export"), "--format", "ga4",
               "--task", "session", "--step", "3d", "--models", "logreg", "--min-positives", "20",
               "--min-negatives", "20"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    metrics = json.loads((ws / "runs" / "logreg" / "metrics.json").read_text())
    assert metrics["task"]["task"] == "session" and metrics["test"]["positives"] > 0
    con = Workspace(ws).connect()
    assert con.sql("SELECT count(*) FROM events WHERE event = 'checkout'").fetchall()[0][0] > 0


def test_typed_parquet_rows_without_user_or_time_are_rejects(tmp_path):
    """A Parquet export of the documented types is flattened from its structs; its bad rows are still rejects."""
    full = {f.name: None for f in SCHEMA}
    good = {**full, **_row()}
    src = [good, {**good, "user_pseudo_id": None}, {**good, "event_timestamp": None},
           {**good, "items": [{"item_id": "SKU_2", "price": -1.0}]}]
    pq.write_table(pa.Table.from_pylist(src, schema=SCHEMA), tmp_path / "events_20240301.parquet")
    r = ingest(tmp_path / "ws", [tmp_path / "events_20240301.parquet"], GA4, progress=False)
    assert r.accepted == 1 and r.rejected == {"missing_user": 1, "missing_ts": 1, "negative_price": 1}
    rows = _rejects(r)
    assert [(int(x["line"]), x["reason"]) for x in rows] == [(2, "missing_user"), (3, "missing_ts"),
                                                            (4, "negative_price")]
    assert json.loads(rows[2]["raw"])["item_id"] == "SKU_2" and "123.456" not in r.rejects_paths[0].read_text()
    df = _events(tmp_path / "ws")
    assert df["session_id"].notna().all() and df["item_id"].tolist() == ["SKU_1"]


def test_intraday_tables_of_a_day_with_its_daily_table_and_not_set_items(tmp_path, monkeypatch):
    """A folder holding events_D and events_intraday_D (BigQuery's events_* wildcard exports both): the day is
    read once; GA4's '(not set)' item and category are missing, not one item; a click id is not kept in rejects."""
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "ab" * 32)
    folder = tmp_path / "export"
    folder.mkdir()
    day = [_row(event_timestamp=1709287200000000 + i) for i in range(4)]
    _ndjson(folder / "events_20240301.json", day)
    _ndjson(folder / "events_intraday_20240301.json", day[:2])
    _ndjson(folder / "events_intraday_20240302.json", [_row(
        event_timestamp=1709373600000000, items=[{"item_id": "(not set)", "item_category": "(not set)", "price": 5}]),
        _row(event_timestamp=1709373600000001, user_pseudo_id=None,  # a consent-mode record of 3 items: 1 reject
             collected_traffic_source={"gclid": "gclid-secret-1"}, items=[{"item_id": f"S{i}"} for i in range(3)])])
    r = ingest(tmp_path / "ws", [folder], DataConfig(format="ga4"), progress=False)
    assert r.accepted == 5 and r.rejected == {"missing_user": 1} and len(r.files) == 2
    got = Workspace(tmp_path / "ws").connect().sql("SELECT item_id, category FROM events ORDER BY ts").fetchall()
    assert got[-1] == (None, None) and got[0] == ("SKU_1", "Shoes")
    assert "gclid-secret-1" not in "".join(p.read_text() for p in (tmp_path / "ws" / "rejects").glob("*.csv"))
