"""Request and response models of the scoring API (pydantic v2).

Times (``ts``, ``at``) are ISO 8601 text (``Z`` or an offset; naive text is UTC) or epoch
seconds; they must lie between 1970 and a few minutes from now. Ids may be strings or integers
(integers are read as their decimal text). Unknown fields are rejected so that typos surface.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StrictInt, WithJsonSchema

from ..times import EPOCH, from_epoch_seconds, parse_iso
from ..vocabulary import CANONICAL_EVENTS

EVENT_NAMES = CANONICAL_EVENTS
FUTURE_TOLERANCE = timedelta(minutes=5)  # clock skew allowed for times in the future
MAX_ID_CHARS = 256
MAX_PRICE = 1e9
HARD_MAX_EVENTS = 100_000  # schema bound; the server's own (smaller) limit is checked in the route
HARD_MAX_USERS = 10_000


def parse_timestamp(value: Any) -> datetime:
    """ISO 8601 text or epoch seconds -> tz-naive UTC datetime; ValueError with the reason.

    ``times.parse_iso`` / ``times.from_epoch_seconds`` with the API's bounds: text of at most 40
    characters, no numeric text, times between 1970 and a few minutes from now. Runs once per event
    of a request, so the common case (text) takes the shortest path."""
    if type(value) is str:
        text = value.strip()
        if not text or len(text) > 40:
            raise ValueError(f"cannot parse {value[:40]!r} as an ISO 8601 time")
        try:
            t = parse_iso(text)
        except ValueError:
            raise ValueError(f"cannot parse {text!r} as an ISO 8601 time (e.g. 2017-12-02T10:00:00Z)") from None
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
            raise ValueError(f"time {text!r} is out of range") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < 1e11:  # also NaN, inf and integers too large for a float
            raise ValueError(f"epoch seconds {value!r} out of range")
        t = from_epoch_seconds(value)
    else:
        raise ValueError("must be an ISO 8601 string or epoch seconds (a number)")
    if t < EPOCH:
        raise ValueError(f"time {t.isoformat()} is before 1970")
    if t > EPOCH + timedelta(seconds=time.time()) + FUTURE_TOLERANCE:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        raise ValueError(f"time {t.isoformat()}Z lies in the future (now is {now.isoformat(timespec='seconds')}Z)")
    return t


Timestamp = Annotated[
    datetime,
    PlainValidator(parse_timestamp),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
                    "description": "ISO 8601 (UTC if no offset) or epoch seconds"}),
]
# an id is text, or an integer read as its decimal text; checked inside pydantic-core (Python runs
# for integers only), as a request holds hundreds of ids
Id = Annotated[
    Union[Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)],
          Annotated[StrictInt, Field(gt=-10 ** (MAX_ID_CHARS - 1), lt=10 ** MAX_ID_CHARS), AfterValidator(str)]],
    Field(union_mode="left_to_right"),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}, {"type": "integer"}]}),
]
Price = Annotated[float, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False)]
EventName = Literal[CANONICAL_EVENTS]  # the canonical events of ``vocabulary``


class Event(BaseModel):
    """One behaviour event of the shopper; only ``ts`` and ``event`` are required."""

    model_config = ConfigDict(extra="forbid")
    ts: Timestamp
    event: EventName
    item_id: Optional[Id] = None
    category: Optional[Id] = None
    price: Optional[Price] = None
    session_id: Optional[Id] = None
    # the event name as the shop's tracking wrote it ("begin_checkout"), as ingest stores it in
    # `raw_event`; the model hashes it into a token field. Default: the canonical `event`
    raw_event: Optional[Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]] = None


class ScoreRequest(BaseModel):
    """A shopper's recent events; ``at`` (the cutoff) defaults to the last event + 1 microsecond."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "user_id": "u1", "at": "2017-12-03T00:00:00Z",
            "events": [{"ts": "2017-12-02T10:00:00Z", "event": "view", "item_id": "i1", "category": "c1",
                        "price": 9.5, "session_id": "s1"}]}]},
    )
    user_id: Optional[Id] = None
    at: Optional[Timestamp] = None
    events: list[Event] = Field(min_length=1, max_length=HARD_MAX_EVENTS)


class BatchRequest(BaseModel):
    """Several shoppers in one request (each with its own events and ``at``)."""

    model_config = ConfigDict(extra="forbid")
    users: list[ScoreRequest] = Field(min_length=1, max_length=HARD_MAX_USERS)


class ReloadRequest(BaseModel):
    """Swap in a run from the server's runs directory (default: reload the current run name)."""

    model_config = ConfigDict(extra="forbid")
    run: Optional[Id] = None


class ScoreResponse(BaseModel):
    probability: float = Field(description="probability of a purchase in the run's horizon after `at`")
    model: str
    version: str = Field(description="version of the run that answered")
    at: str = Field(description="the cutoff used (UTC); events at or after it were not used")
    run: str
    n_events: int = Field(description="events before `at` that the features saw")
    active: bool = Field(description="the user had an event in the run's lookback before `at` "
                                     "(batch scores cover active users only)")
    user_id: Optional[str] = Field(default=None, description="the pseudonym of the user id")
    reasons: Optional[list[dict[str, Any]]] = Field(
        default=None, description="with ?explain=true: the top reasons, each {feature|group, contribution "
                                  "(signed, log-odds), text}")


class BatchItem(BaseModel):
    user_id: Optional[str] = Field(default=None, description="the user id as sent")
    probability: float
    at: str
    n_events: int
    active: bool
    reasons: Optional[list[dict[str, Any]]] = Field(default=None, description="with ?explain=true: the top reasons")


class BatchResponse(BaseModel):
    model: str
    version: str
    run: str
    results: list[BatchItem]


class ModelInfo(BaseModel):
    run: str
    model: str
    version: str
    task: str
    lookback: str
    horizon: str
    members: Optional[str] = None  # an ensemble's member runs, "name@version" comma-separated
    previous_version: Optional[str] = None
