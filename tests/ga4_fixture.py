"""A Google Analytics 4 BigQuery export of the seeded simulated shop, written as Google documents it.

    python tests/ga4_fixture.py OUT_DIR [--users 600 --days 28 --format parquet|ndjson]

The rows follow the export schema of https://support.google.com/analytics/answer/7029846 (one
table ``events_YYYYMMDD`` per day): ``event_date`` STRING, ``event_timestamp`` INT64 (µs),
``event_name``, ``event_params`` ARRAY<STRUCT<key, value STRUCT<string_value, int_value,
float_value, double_value>>>, ``user_id`` (set only for signed-in users), ``user_pseudo_id``,
``user_properties``, ``user_first_touch_timestamp``, ``device``, ``geo``, ``traffic_source``,
``stream_id``, ``platform``, ``ecommerce`` and ``items`` ARRAY<STRUCT<item_id, item_name,
item_brand, item_variant, item_category, ..., price, quantity, item_revenue, ...>>. Parquet is
written with that nested schema; NDJSON the way BigQuery's JSON export writes it (INT64 as
strings, NULL fields left out).

The behaviour is ``simulate.py``'s (no real data): each simulated session becomes a GA4 session
(``session_start``, a ``page_view`` before each item view, ``user_engagement``), view / cart /
remove / wishlist become ``view_item`` / ``add_to_cart`` / ``remove_from_cart`` /
``add_to_wishlist``, and a purchase becomes the checkout funnel ``begin_checkout`` →
``add_shipping_info`` → ``add_payment_info`` → ``purchase``; a share of carts also start a checkout
that is abandoned after one to three of its steps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from purchase_intent.simulate import SimConfig, simulate

_VALUE = pa.struct([("string_value", pa.string()), ("int_value", pa.int64()), ("float_value", pa.float64()),
                    ("double_value", pa.float64())])
_PARAMS = pa.list_(pa.struct([("key", pa.string()), ("value", _VALUE)]))
_ITEM = pa.struct([("item_id", pa.string()), ("item_name", pa.string()), ("item_brand", pa.string()),
                   ("item_variant", pa.string()), ("item_category", pa.string()), ("item_category2", pa.string()),
                   ("price_in_usd", pa.float64()), ("price", pa.float64()), ("quantity", pa.int64()),
                   ("item_revenue_in_usd", pa.float64()), ("item_revenue", pa.float64()),
                   ("item_list_name", pa.string()), ("promotion_name", pa.string())])
SCHEMA = pa.schema([
    ("event_date", pa.string()), ("event_timestamp", pa.int64()), ("event_name", pa.string()),
    ("event_params", _PARAMS), ("event_previous_timestamp", pa.int64()),
    ("event_value_in_usd", pa.float64()), ("event_bundle_sequence_id", pa.int64()),
    ("event_server_timestamp_offset", pa.int64()), ("user_id", pa.string()), ("user_pseudo_id", pa.string()),
    ("privacy_info", pa.struct([("analytics_storage", pa.string()), ("ads_storage", pa.string()),
                                ("uses_transient_token", pa.string())])),
    ("user_properties", _PARAMS), ("user_first_touch_timestamp", pa.int64()),
    ("user_ltv", pa.struct([("revenue", pa.float64()), ("currency", pa.string())])),
    ("device", pa.struct([("category", pa.string()), ("mobile_brand_name", pa.string()),
                          ("operating_system", pa.string()), ("language", pa.string()),
                          ("web_info", pa.struct([("browser", pa.string()), ("hostname", pa.string())]))])),
    ("geo", pa.struct([("continent", pa.string()), ("country", pa.string()), ("region", pa.string()),
                       ("city", pa.string())])),
    ("traffic_source", pa.struct([("name", pa.string()), ("medium", pa.string()), ("source", pa.string())])),
    ("stream_id", pa.string()), ("platform", pa.string()),
    ("ecommerce", pa.struct([("total_item_quantity", pa.int64()), ("purchase_revenue_in_usd", pa.float64()),
                             ("purchase_revenue", pa.float64()), ("shipping_value", pa.float64()),
                             ("tax_value", pa.float64()), ("unique_items", pa.int64()),
                             ("transaction_id", pa.string())])),
    ("items", pa.list_(_ITEM)),
])

# simulated event -> GA4 recommended e-commerce event
GA4_NAMES = {"view": "view_item", "cart": "add_to_cart", "remove_from_cart": "remove_from_cart",
             "wishlist": "add_to_wishlist", "purchase": "purchase"}
CHECKOUT = ("begin_checkout", "add_shipping_info", "add_payment_info")


def _param(key: str, value) -> dict:
    v = {"string_value": None, "int_value": None, "float_value": None, "double_value": None}
    v["int_value" if isinstance(value, int) else "double_value" if isinstance(value, float) else "string_value"] = value
    return {"key": key, "value": v}


def ga4_rows(users: int = 600, days: int = 28, seed: int = 0, abandon: float = 0.25) -> list[dict]:
    """The GA4 export rows (dicts of the export schema) of the simulated shop, in time order."""
    log = simulate(SimConfig(n_users=users, days=days, seed=seed, n_items=800, n_categories=12))
    rng = np.random.default_rng(seed + 1)
    signed_in = {u for u in log["user_id"].unique() if rng.random() < 0.3}
    rows: list[dict] = []
    seen_sessions: set[str] = set()
    n_session = {}
    for r in log.itertuples(index=False):
        us = int(r.ts) * 1000  # ms -> µs
        pseudo = f"{(int(r.user_id[1:]) * 2654435761 + seed) % 10**10}.{1700000000 + int(r.user_id[1:])}"
        first_in_session = r.session_id not in seen_sessions
        if first_in_session:
            seen_sessions.add(r.session_id)
            n_session[r.user_id] = n_session.get(r.user_id, 0) + 1
        ga_sid = int(r.ts) // 1000 if first_in_session else None
        base = dict(user_id=r.user_id.replace("u", "member-") if r.user_id in signed_in else None,
                    user_pseudo_id=pseudo, session=r.session_id)
        item = {"item_id": f"SKU_{r.item_id[1:]}", "item_name": f"Product {r.item_id[1:]}", "item_brand": "Acme",
                "item_variant": None, "item_category": f"Category {r.category[1:]}", "item_category2": None,
                "price_in_usd": float(r.price), "price": float(r.price), "quantity": 1,
                "item_revenue_in_usd": float(r.price) if r.event == "purchase" else None,
                "item_revenue": float(r.price) if r.event == "purchase" else None,
                "item_list_name": None, "promotion_name": None}
        steps: list[tuple[int, str, list]] = []
        if first_in_session:
            steps += [(us - 3_000_000, "session_start", []), (us - 2_000_000, "page_view", [])]
        if r.event == "view":
            steps += [(us - 1_000_000, "page_view", []), (us, "view_item", [item])]
            if rng.random() < 0.1:
                steps.append((us + 500_000, "user_engagement", []))
        elif r.event == "purchase":
            steps += [(us - (40 - 10 * i) * 1_000_000, name, [item]) for i, name in enumerate(CHECKOUT)]
            steps.append((us, "purchase", [item]))
        else:
            steps.append((us, GA4_NAMES[r.event], [item]))
            if r.event == "cart" and rng.random() < abandon:  # a checkout left after 1-3 of its steps
                depth = int(rng.integers(1, len(CHECKOUT) + 1))
                steps += [(us + (20 + 10 * i) * 1_000_000, name, [item]) for i, name in enumerate(CHECKOUT[:depth])]
        for t, name, items in steps:
            rows.append({**base, "ts": t, "name": name, "items": items, "ga_sid": ga_sid,
                         "session_number": n_session[r.user_id]})
    # ga_session_id is the session's start (s), carried by every event of the session
    sid_of: dict[str, int] = {}
    for row in rows:
        if row["ga_sid"] is not None:
            sid_of.setdefault(row["session"], row["ga_sid"])
    out = []
    for row in sorted(rows, key=lambda x: x["ts"]):
        day = np.datetime64(row["ts"], "us").astype("datetime64[D]").astype(str).replace("-", "")
        items = row["items"]
        purchase = row["name"] == "purchase"
        out.append({
            "event_date": day, "event_timestamp": row["ts"], "event_name": row["name"],
            "event_params": [_param("ga_session_id", sid_of[row["session"]]),
                             _param("ga_session_number", row["session_number"]),
                             _param("page_location", f"https://shop.example/{row['name']}"),
                             _param("engagement_time_msec", 1200)],
            "event_previous_timestamp": None, "event_value_in_usd": items[0]["price"] if purchase else None,
            "event_bundle_sequence_id": 1, "event_server_timestamp_offset": 512,
            "user_id": row["user_id"], "user_pseudo_id": row["user_pseudo_id"],
            "privacy_info": {"analytics_storage": "Yes", "ads_storage": "Yes", "uses_transient_token": "No"},
            "user_properties": [], "user_first_touch_timestamp": None,
            "user_ltv": {"revenue": 0.0, "currency": "USD"},
            "device": {"category": "desktop", "mobile_brand_name": None, "operating_system": "Linux",
                       "language": "en-us", "web_info": {"browser": "Firefox", "hostname": "shop.example"}},
            "geo": {"continent": "Europe", "country": "France", "region": "Île-de-France", "city": "Paris"},
            "traffic_source": {"name": "(direct)", "medium": "(none)", "source": "(direct)"},
            "stream_id": "1234567890", "platform": "WEB",
            "ecommerce": ({"total_item_quantity": 1, "purchase_revenue_in_usd": items[0]["price"],
                           "purchase_revenue": items[0]["price"], "shipping_value": 0.0, "tax_value": 0.0,
                           "unique_items": 1, "transaction_id": f"T{row['ts']}"} if purchase else None),
            "items": items,
        })
    return out


def _ndjson_value(v):
    """BigQuery's JSON export: INT64 as a string, NULL fields left out."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return str(v)
    if isinstance(v, dict):
        return {k: _ndjson_value(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_ndjson_value(x) for x in v]
    return v


def write_ga4(rows: list[dict], out: str | Path, fmt: str = "parquet") -> list[Path]:
    """One ``events_YYYYMMDD`` file per day under ``out`` (``.parquet`` or ``.json``, NDJSON)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    days: dict[str, list[dict]] = {}
    for r in rows:
        days.setdefault(r["event_date"], []).append(r)
    paths = []
    for day, day_rows in sorted(days.items()):
        if fmt == "parquet":
            p = out / f"events_{day}.parquet"
            pq.write_table(pa.Table.from_pylist(day_rows, schema=SCHEMA), p)
        else:
            p = out / f"events_{day}.json"
            p.write_text("".join(json.dumps(_ndjson_value(r), ensure_ascii=False) + "\n" for r in day_rows))
        paths.append(p)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--users", type=int, default=600)
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["parquet", "ndjson"], default="parquet")
    a = ap.parse_args()
    files = write_ga4(ga4_rows(a.users, a.days, a.seed), a.out, a.format)
    print(f"wrote {len(files)} files to {a.out}")
