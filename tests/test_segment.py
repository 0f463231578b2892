"""`--format segment`: Segment / RudderStack track calls (JSON Lines, the Segment e-commerce spec)."""
from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from purchase_intent.config import DataConfig
from purchase_intent.events import ingest
from purchase_intent.simulate import SimConfig, simulate
from purchase_intent.workspace import Workspace

SEGMENT = DataConfig(format="segment")
# simulated event -> the Segment e-commerce spec's track name
SPEC = {"view": "Product Viewed", "cart": "Product Added", "remove_from_cart": "Product Removed",
        "wishlist": "Product Added to Wishlist", "purchase": "Order Completed"}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def segment_tracks(users: int = 80, days: int = 7, seed: int = 2) -> list[dict]:
    """Track calls of the simulated shop: one product per call, an order as ``products[]``; the
    checkout steps before each order; anonymous visitors until they sign in (``userId``)."""
    log = simulate(SimConfig(n_users=users, days=days, seed=seed, n_items=300, n_categories=8))
    out = []
    for r in log.itertuples(index=False):
        signed_in = r.event in ("cart", "purchase")
        base = {"type": "track", "userId": r.user_id if signed_in else "", "anonymousId": f"anon-{r.user_id}",
                "context": {"ip": "203.0.113.9", "traits": {"email": "someone@example.com"}}}
        product = {"product_id": r.item_id, "category": r.category, "price": float(r.price), "quantity": 1}
        if r.event == "purchase":
            for i, step in enumerate(("Checkout Started", "Checkout Step Completed", "Payment Info Entered")):
                out.append({**base, "event": step, "timestamp": _iso(int(r.ts) - 30_000 + 10_000 * i),
                            "properties": {"products": [product]}})
            out.append({**base, "event": "Order Completed", "timestamp": _iso(int(r.ts)),
                        "properties": {"order_id": f"o{len(out)}", "products": [product]}})
        else:
            out.append({**base, "event": SPEC[r.event], "timestamp": _iso(int(r.ts)), "properties": product})
    return [{**call, "messageId": f"m{i}"} for i, call in enumerate(out)]  # one id per call, as the spec says


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _track(**over) -> dict:
    return {"type": "track", "event": "Product Viewed", "userId": None, "anonymousId": "a1",
            "timestamp": "2024-03-01T10:00:00.000Z",
            "properties": {"product_id": "p1", "category": "Shoes", "price": 20}, **over}


def test_simulated_tracks_map_by_the_spec(tmp_path):
    tracks = segment_tracks()
    r = ingest(tmp_path / "ws", [_jsonl(tmp_path / "tracks.jsonl", tracks)], SEGMENT, progress=False)
    assert r.accepted == len(tracks) and not r.rejected and not r.unmapped
    df = Workspace(tmp_path / "ws").connect().sql("SELECT * FROM events").df()
    pairs = set(zip(df["raw_event"], df["event"]))
    assert pairs == {("Product Viewed", "view"), ("Product Added", "cart"), ("Product Removed", "remove_from_cart"),
                     ("Product Added to Wishlist", "wishlist"), ("Checkout Started", "checkout"),
                     ("Checkout Step Completed", "checkout"), ("Payment Info Entered", "checkout"),
                     ("Order Completed", "purchase")}
    assert df["item_id"].notna().all() and df["category"].notna().all() and df["price"].notna().all()
    # userId when set, else anonymousId: a shopper who signs in to cart is two users here
    assert df["user_id"].nunique() > len({t["anonymousId"] for t in tracks})


def test_products_one_event_each_anonymous_fallback_pages_and_sessions(tmp_path, monkeypatch):
    monkeypatch.setenv("PURCHASE_INTENT_PSEUDONYM_KEY", "segment-test-key-0123456789")
    order = _track(event="Order Completed", userId="user-9", properties={
        "order_id": "o1", "products": [{"product_id": "p1", "category": "Shoes", "price": 20},
                                       {"id": "p2", "price": 5.5}]})
    src = [order,
           _track(userId="", context={"sessionId": 1709287100}),  # RudderStack: context.sessionId
           {"type": "page", "anonymousId": "a1", "name": "Home", "timestamp": "2024-03-01T10:05:00Z"},
           _track(event="Promotion Clicked", properties={}),
           {"type": "identify", "userId": "user-9", "traits": {"email": "x@example.com"},
            "timestamp": "2024-03-01T10:06:00Z"}]
    r = ingest(tmp_path / "ws", [_jsonl(tmp_path / "t.jsonl", src)], SEGMENT, progress=False)
    assert r.accepted == 5 and r.rejected == {"not_an_event": 1}
    assert r.unmapped == {"Promotion Clicked": 1, "page": 1}
    df = Workspace(tmp_path / "ws").connect().sql("SELECT * FROM events ORDER BY ts, item_id").df()
    bought = df[df["event"] == "purchase"]
    assert bought["item_id"].tolist() == ["p1", "p2"] and bought["price"].tolist() == [20, 5.5]
    assert bought["category"].iloc[0] == "Shoes" and bought["category"].isna().iloc[1]
    assert bought["user_id"].nunique() == 1
    assert df["user_id"].nunique() == 2  # user-9, and a1 for the anonymous calls
    assert df["session_id"].notna().sum() == 1
    text = r.rejects_paths[0].read_text()
    assert "x@example.com" not in text and "user-9" not in text  # traits dropped, ids pseudonymised


def test_bad_tracks_are_rejects_with_reasons(tmp_path):
    src = [_track(),
           _track(anonymousId=None),  # no user at all
           _track(timestamp="next tuesday"),
           _track(properties="p1"),  # properties no object
           _track(properties={"products": {"product_id": "p1"}}),  # products no list
           _track(properties={"products": ["p1"]}),  # a product no object
           _track(event=["Product Viewed"]),
           "[1, 2]",
           _track(properties={"product_id": "p1", "price": "free"})]
    r = ingest(tmp_path / "ws", [_jsonl(tmp_path / "t.jsonl", src)], SEGMENT, progress=False)
    assert r.accepted == 1
    assert r.rejected == {"missing_user": 1, "bad_ts": 1, "bad_field_type": 4, "malformed_line": 1, "bad_price": 1}
    with open(r.rejects_paths[0], newline="") as f:
        got = [(int(x["line"]), x["reason"]) for x in csv.DictReader(f)]
    assert got == [(2, "missing_user"), (3, "bad_ts"), (4, "bad_field_type"), (5, "bad_field_type"),
                   (6, "bad_field_type"), (7, "bad_field_type"), (8, "malformed_line"), (9, "bad_price")]


@pytest.mark.parametrize("strict", [False, True])
def test_strict_events(tmp_path, strict):
    path = _jsonl(tmp_path / "t.jsonl", [_track(), _track(event="Coupon Applied")])
    r = ingest(tmp_path / "ws", [path], DataConfig(format="segment", strict_events=strict), progress=False)
    assert (r.accepted, r.rejected, r.unmapped) == ((1, {"unknown_event": 1}, {}) if strict else
                                                   (2, {}, {"Coupon Applied": 1}))


def test_calls_as_the_http_api_sends_them(tmp_path):
    """A track without `timestamp` (originalTimestamp, else receivedAt); an order's product without a price
    takes no order-level price; a batch body, an alias and RudderStack's fields are rejects whose ids are
    pseudonymised and whose context is dropped at any depth; a JSON array is named so."""
    batch = {"batch": [_track(userId="u-secret-3", context={"ip": "203.0.113.7", "traits": {"email": "x@y.z"}})],
             "sentAt": "2024-03-01T10:00:00Z"}
    src = _jsonl(tmp_path / "api.jsonl", [
        {**_track(userId="u1"), "timestamp": None, "originalTimestamp": "2024-03-01T09:00:00Z",
         "receivedAt": "2024-03-01T09:00:05Z"},
        {k: v for k, v in _track(userId="u2").items() if k != "timestamp"} | {"receivedAt": "2024-03-01T11:00:00Z"},
        _track(userId="u3", event="Order Completed",
               properties={"price": 99, "products": [{"product_id": "p9", "category": "Bags"}]}),
        batch,
        {"type": "alias", "previousId": "anon-secret-7", "userId": "u7", "timestamp": "2024-03-01T10:00:00Z"},
        {"type": "identify", "userId": None, "anonymousId": None, "rudderId": "rudder-secret-8",
         "request_ip": "198.51.100.4", "timestamp": "2024-03-01T10:00:00Z"},
    ])
    dup = _track(userId="u4", event="Order Completed", messageId="m-1", timestamp="2024-03-01T12:00:00Z")
    with open(src, "a") as f:  # the same call delivered twice (at least once): one purchase
        f.write(json.dumps(dup) + "\n" + json.dumps(dup) + "\n")
    r = ingest(tmp_path / "ws", [src], DataConfig(format="segment"), progress=False)
    assert r.accepted == 4 and r.rejected == {"not_an_event": 2, "missing_user": 1, "duplicate_message": 1}
    got = Workspace(tmp_path / "ws").connect().sql("SELECT ts, price FROM events ORDER BY ts").fetchall()
    assert [str(t) for t, _ in got] == ["2024-03-01 09:00:00", "2024-03-01 10:00:00", "2024-03-01 11:00:00",
                                        "2024-03-01 12:00:00"]
    assert [p for _, p in got][1] is None  # the product's price, not the order's 99
    text = "".join(p.read_text() for p in (tmp_path / "ws" / "rejects").glob("*.csv"))
    for secret in ("u-secret-3", "203.0.113.7", "x@y.z", "anon-secret-7", "rudder-secret-8", "198.51.100.4"):
        assert secret not in text, secret
    (tmp_path / "array.json").write_text(json.dumps([_track(userId="u1"), _track(userId="u2")]))
    with pytest.raises(ValueError, match="is a JSON array, not JSON Lines .* jq -c"):
        ingest(tmp_path / "ws2", [tmp_path / "array.json"], DataConfig(format="segment"), progress=False)
    (tmp_path / "pretty.json").write_text(json.dumps(_track(userId="u1"), indent=2))
    with pytest.raises(ValueError, match="over several lines"):
        ingest(tmp_path / "ws2", [tmp_path / "pretty.json"], DataConfig(format="jsonl"), progress=False)
