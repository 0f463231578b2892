"""The canonical event log's vocabulary: its columns, its event names and their token codes.

Defined once here; ingest validates against it, features count by it, sequences tokenise with it,
the API accepts it and explanations read the codes back. Imports nothing of the package.
"""
from __future__ import annotations

CANONICAL_COLUMNS = ("user_id", "ts", "event", "item_id", "category", "price", "session_id")
# every event ingest accepts; raw names that map to none of the others become "other"
CANONICAL_EVENTS = ("view", "cart", "remove_from_cart", "wishlist", "purchase", "other")
# the shop actions that features count one by one (all canonical events but "other")
EVENT_TYPES = CANONICAL_EVENTS[:-1]
# sequence token of each event: 1..6 in the order above (0 = padding)
EVENT_CODES = {name: i + 1 for i, name in enumerate(CANONICAL_EVENTS)}
OTHER_CODE = EVENT_CODES["other"]  # the token of any name that is no canonical event
