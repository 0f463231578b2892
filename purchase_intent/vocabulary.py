"""The canonical event log's vocabulary: its columns, its event names and their token codes.

Defined once here; ingest validates against it, features count by it, sequences tokenise with it,
the API accepts it and explanations read the codes back. Imports nothing of the package.
"""
from __future__ import annotations

CANONICAL_COLUMNS = ("user_id", "ts", "event", "item_id", "category", "price", "session_id")
# the event name as the source wrote it ("begin_checkout", "Product Viewed"), stored next to the
# canonical `event`; parts ingested before it existed lack it and read as raw_event = event
RAW_EVENT = "raw_event"
# every event ingest accepts; raw names that map to none of the others become "other"
CANONICAL_EVENTS = ("view", "cart", "remove_from_cart", "wishlist", "checkout", "purchase", "other")
# the shop actions that features count one by one (all canonical events but "other")
EVENT_TYPES = tuple(e for e in CANONICAL_EVENTS if e != "other")
# sequence token of each event (0 = padding). The codes never change meaning: "checkout" came
# later and took the next free code, so a run trained before it reads every old token as it did
# (and clips the new code 7 to its last row, "other", which is what checkout was then)
EVENT_CODES = {"view": 1, "cart": 2, "remove_from_cart": 3, "wishlist": 4, "purchase": 5, "other": 6, "checkout": 7}
OTHER_CODE = EVENT_CODES["other"]  # the token of any name that is no canonical event
