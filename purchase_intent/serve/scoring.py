"""Serving state and the scoring path of the API: the loaded run, auth, hot swap, request scoring.

A request's events become canonical event columns (user and session ids pseudonymised with the
workspace key, as at ingest). User-task runs compute their features with
``feature_frame.compute_features_frame``, the numpy form of the training feature SQL (tests prove both
agree on every feature), because parsing and planning that SQL costs more than the whole request
budget; sequences (Transformer) likewise come from ``sequence_frame.build_sequences_frame``, the numpy
form of ``sequences.build_sequences`` (tests prove both give the same arrays). Session-task runs and
the known-user route use ``runs.inputs_for_examples`` over the events put in a per-thread in-memory
DuckDB, the code that built the training features.
"""
from __future__ import annotations

import gc
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from .. import runs
from ..explain import explain_inputs
from ..feature_frame import compute_features_frame
from ..labels import single_example
from ..privacy import pseudonymise_raw, workspace_key
from ..runs import Run
from ..sequence_frame import build_sequences_frame
from ..times import ONE_US
from ..workspace import Workspace
from .metrics import Metrics
from .schemas import ScoreRequest
from .settings import ServeSettings, resolve_run_dir

log = logging.getLogger("purchase_intent.serve")


@dataclass
class Predicted:
    """Probabilities of a batch of examples, shape (N,), and each example's top reasons when asked for."""

    probabilities: np.ndarray
    reasons: Optional[list[list[dict]]] = None


@dataclass
class Scored:
    """What the scoring routes answer for the users of a request, one entry per user, in order."""

    probabilities: np.ndarray  # (N,)
    cutoffs: list[datetime]  # the time each user was scored at
    n_events: list[int]  # events before the cutoff
    active: list[bool]  # an event within the run's lookback before the cutoff
    user_ids: list[str]  # pseudonyms (``anonymous-i`` for users sent without an id)
    reasons: Optional[list[list[dict]]] = None  # top reasons per user, when asked for


class ApiError(Exception):
    """A 4xx answer whose message names the offending field."""

    def __init__(self, status: int, field: str, message: str, kind: str = "validation"):
        super().__init__(message)
        self.status, self.field, self.message, self.kind = status, field, message, kind


class ServeState:
    """What the routes share: settings, the current run, the pseudonym key, metrics, DuckDB handles."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = Metrics()
        self.key = workspace_key(Path(settings.workspace))
        self._digests = [hashlib.sha256(k.encode()).digest() for k in settings.api_keys]
        self._local = threading.local()
        self._cons: list = []  # every DuckDB connection handed out, closed at shutdown
        self._reload_lock = threading.Lock()
        self.current: Optional[Run] = None
        self.current = runs.load_run_dir(resolve_run_dir(settings.runs_path, settings.run))
        self.last_reload_ok: float = time.time()  # when the run now served was loaded (epoch seconds)
        self.last_reload_failure: Optional[dict] = None  # {"run", "error", "at"} of the last failed reload
        self.metrics.reload_succeeded(self.last_reload_ok)
        self._drift: tuple[Optional[tuple], Optional[dict]] = (None, None)  # (file stamp, monitor.json)
        self._freeze_gc()

    def _freeze_gc(self) -> None:
        """With ``settings.freeze_gc``: move what is loaded out of the collector's sight (fewer,
        shorter pauses in requests); unfreezing first lets a replaced run be collected."""
        if self.settings.freeze_gc:
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    # --- auth: every key is compared (constant time), no early exit
    def authorised(self, header: Optional[str]) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        presented = hashlib.sha256(header[7:].strip().encode()).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, presented)
        return ok

    # --- hot swap
    def reload(self, run: Optional[str] = None) -> tuple[Run, Optional[str]]:
        """Load ``run`` (default: the current run's name) and swap it in; returns (new, old version).

        A run that fails to load raises and leaves the current run serving; the failure (run,
        error, time) stays in ``last_reload_failure`` until a reload succeeds."""
        with self._reload_lock:
            old = self.current
            name = run or (old.name if old else self.settings.run)
            try:
                new = runs.load_run_dir(resolve_run_dir(self.settings.runs_path, name))
            except Exception as e:  # recorded for /readyz and /metrics, then raised to the caller
                now = time.time()
                self.last_reload_failure = {"run": name, "error": f"{type(e).__name__}: {e}",
                                            "at": datetime.fromtimestamp(now, timezone.utc).isoformat()}
                self.metrics.reload("failed")
                raise
            self.current = new  # one reference assignment: in-flight requests keep `old`
            self.last_reload_ok = time.time()
            self.last_reload_failure = None
            self.metrics.reload("ok")
            self.metrics.reload_succeeded(self.last_reload_ok)
            self._freeze_gc()
            return new, (old.info["version"] if old else None)

    # --- DuckDB: one connection per worker thread (connections are not shared across threads)
    def request_con(self):
        con = getattr(self._local, "mem", None)
        if con is None:
            con = self._local.mem = duckdb.connect(":memory:")
            con.execute("SET threads = 1")
            with self._reload_lock:
                self._cons.append(con)
        return con

    def workspace_con(self):
        con = getattr(self._local, "ws", None)
        if con is None:
            con = self._local.ws = Workspace(self.settings.workspace).connect()
            with self._reload_lock:
                self._cons.append(con)
        return con

    def drift_report(self) -> Optional[dict]:
        """The served run's ``monitor.json`` (what `purchase-intent monitor` found last), or None.

        Read again only when the file changes, so a monitor run shows at the next scrape with no
        reload; an unreadable file counts as none (and is logged)."""
        run = self.current
        if run is None:
            return None
        path = run.dir / runs.MONITOR_JSON
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (str(path), st.st_mtime_ns, st.st_size)
        cached_stamp, report = self._drift
        if stamp != cached_stamp:
            try:
                report = json.loads(path.read_text())
                report = report if isinstance(report, dict) else None
            except (OSError, ValueError) as e:
                log.warning("cannot read %s: %s", path, e)
                report = None
            self._drift = (stamp, report)
        return report

    def reload_status(self) -> dict:
        """What /readyz says of hot swaps: the last success, and the last failure since then (or None)."""
        return {"ok": self.last_reload_failure is None,
                "last_success_at": datetime.fromtimestamp(self.last_reload_ok, timezone.utc).isoformat(),
                "last_failure": self.last_reload_failure}

    def close(self) -> None:
        """Close every DuckDB connection; one that fails to close is logged and the rest still closed."""
        with self._reload_lock:
            for con in self._cons:
                try:
                    con.close()
                except Exception as e:  # shutting down: report it, keep closing the others
                    self.metrics.error("close")
                    log.warning("could not close a DuckDB connection at shutdown: %s: %s", type(e).__name__, e)
            self._cons.clear()

    def pseudonymise(self, ids: list[str]) -> list[str]:
        return list(pseudonymise_raw(ids, self.key))


# ---------------------------------------------------------------------------------------------
# scoring (shared by the routes)
_SCHEMA = (("user_id", "string"), ("ts", "timestamp[us]"), ("event", "string"), ("item_id", "string"),
           ("category", "string"), ("price", "float64"), ("session_id", "string"), ("raw_event", "string"))


def _event_columns(users: list[ScoreRequest], ids: list[str], sessions: dict[str, str]) -> dict[str, list]:
    """The canonical events of a request as columns: (N_events,) values over all users, with the
    user and session ids replaced by their pseudonyms (as ingest stores them)."""
    cols: dict[str, list] = {c: [] for c, _ in _SCHEMA}
    for uid, u in zip(ids, users):
        ev = u.events
        cols["user_id"] += [uid] * len(ev)
        cols["ts"] += [e.ts for e in ev]
        cols["event"] += [e.event for e in ev]
        cols["item_id"] += [e.item_id for e in ev]
        cols["category"] += [e.category for e in ev]
        cols["price"] += [e.price for e in ev]
        cols["session_id"] += [sessions[e.session_id] if e.session_id is not None else None for e in ev]
        cols["raw_event"] += [e.raw_event if e.raw_event is not None else e.event for e in ev]
    return cols


def _events_table(cols: dict[str, list]):
    """The columns as an Arrow table with the canonical schema (to register as `events`)."""
    schema = pa.schema([(c, pa.type_for_alias(t)) for c, t in _SCHEMA])
    return pa.table(cols, schema=schema)


def _examples(loaded: Run, con, ids: list[str], ats: list[datetime]) -> pd.DataFrame:
    """One example per user at its cutoff (session task: the user's last session before it)."""
    lc = loaded.label_cfg
    if lc.task == "user":
        return pd.DataFrame({"user_id": pd.array(ids, dtype=object),
                             "cutoff": pd.Series(ats, dtype="datetime64[us]")})
    parts = [single_example(con, uid, at, lc).to_pandas() for uid, at in zip(ids, ats)]
    return pd.concat(parts, ignore_index=True)[["user_id", "cutoff", "session_id", "session_start"]]


def predict(loaded: Run, con, ids: list[str], ats: list[datetime], timings: dict[str, float],
            explain_top: int = 0) -> Predicted:
    """Probabilities (len(ids),) with the training feature code over the `events` of `con`, and with
    `explain_top` > 0 each example's top reasons."""
    t0 = time.perf_counter()
    X = runs.inputs_for_examples(loaded.meta, loaded.model, con, _examples(loaded, con, ids, ats))
    t1 = time.perf_counter()
    p = np.asarray(loaded.model.predict_proba(X), dtype=np.float64)[:, 1]
    t2 = time.perf_counter()
    timings["features"] = t1 - t0
    timings["model"] = t2 - t1
    return Predicted(p, _reasons(loaded, X, explain_top, timings))


def _reasons(loaded: Run, X, top: int, timings: dict[str, float]) -> Optional[list]:
    if top <= 0:
        return None
    t0 = time.perf_counter()
    out = explain_inputs(loaded.meta, loaded.model, X, top=top)
    timings["explain"] = time.perf_counter() - t0
    return out


def predict_columns(loaded: Run, cols: dict[str, list], ids: list[str], ats: list[datetime],
                    timings: dict[str, float], explain_top: int = 0) -> Predicted:
    """Probabilities (len(ids),) of user-task examples over a request's event columns.

    Features from ``compute_features_frame`` and sequences from ``build_sequences_frame`` (numpy;
    both equal to the training SQL), so no DuckDB query runs on this path.
    """
    t0 = time.perf_counter()
    ex = pd.DataFrame({"example_id": np.arange(len(ids), dtype=np.int64), "user_id": pd.array(ids, dtype=object),
                       "cutoff": np.array(ats, dtype="datetime64[us]")})
    if loaded.members:  # an ensemble: each member's own inputs (features computed once per config)
        frames: dict[str, pd.DataFrame] = {}
        tabs = []
        for m in loaded.members:
            key = repr(m.feature_cfg)
            if key not in frames:
                frames[key] = compute_features_frame(cols, ex, m.feature_cfg)
            tabs.append(runs.run_features(m.meta, frames[key]))
        t1 = time.perf_counter()
        X = [_with_sequences_frame(m, cols, ex, tab) for m, tab in zip(loaded.members, tabs)]
    else:
        X = runs.run_features(loaded.meta, compute_features_frame(cols, ex, loaded.feature_cfg))
        t1 = time.perf_counter()
        X = _with_sequences_frame(loaded, cols, ex, X)
    t2 = time.perf_counter()
    p = np.asarray(loaded.model.predict_proba(X), dtype=np.float64)[:, 1]
    t3 = time.perf_counter()
    timings["features"] = t1 - t0
    if loaded.vocab is not None or any(m.vocab is not None for m in loaded.members):
        timings["sequences"] = t2 - t1
    timings["model"] = t3 - t2
    return Predicted(p, _reasons(loaded, X, explain_top, timings))


def _with_sequences_frame(loaded: Run, cols: dict[str, list], ex: pd.DataFrame, X: pd.DataFrame):
    """``X`` for a tabular run; for a sequence run its sequences with ``X`` as the "tabular" part."""
    if loaded.vocab is None:
        return X
    return runs.sequence_inputs(build_sequences_frame(cols, ex, loaded.vocab.cfg, loaded.vocab), X,
                                ex["cutoff"].to_numpy())


def score_users(state: ServeState, loaded: Run, users: list[ScoreRequest], where: str,
                timings: dict[str, float], explain_top: int = 0) -> Scored:
    """Score request users on their own events (reasons only when `explain_top` > 0)."""
    t0 = time.perf_counter()
    s = state.settings
    ids, ats, n_before, active = [], [], [], []
    given = [u.user_id for u in users if u.user_id is not None]
    raw_sessions = list(dict.fromkeys(e.session_id for u in users for e in u.events if e.session_id is not None))
    pseudo = state.pseudonymise(given + raw_sessions)
    it = iter(pseudo[:len(given)])
    sessions = dict(zip(raw_sessions, pseudo[len(given):]))
    seen: set[str] = set()
    for i, u in enumerate(users):
        loc = f"{where}[{i}]" if where != "body" else "body"
        if len(u.events) > s.max_events:
            raise ApiError(422, f"{loc}.events", f"at most {s.max_events} events per user, got {len(u.events)}")
        uid = next(it) if u.user_id is not None else f"anonymous-{i}"
        if uid in seen:
            raise ApiError(422, f"{loc}.user_id", f"user_id {u.user_id!r} appears twice in the batch")
        seen.add(uid)
        at = u.at if u.at is not None else max(e.ts for e in u.events) + ONE_US
        before = [e.ts for e in u.events if e.ts < at]
        if not before:
            raise ApiError(422, f"{loc}.events", f"no event before `at` ({at.isoformat()}): nothing to score")
        ids.append(uid)
        ats.append(at)
        n_before.append(len(before))
        active.append(max(before) >= at - loaded.lookback)
    cols = _event_columns(users, ids, sessions)
    timings["prepare"] = time.perf_counter() - t0  # limits, pseudonyms, event columns
    if loaded.task == "user":
        out = predict_columns(loaded, cols, ids, ats, timings, explain_top)
    else:
        con = state.request_con()
        con.register("events", _events_table(cols))
        try:
            out = predict(loaded, con, ids, ats, timings, explain_top)
        finally:
            con.unregister("events")
    return Scored(out.probabilities, cutoffs=ats, n_events=n_before, active=active, user_ids=ids, reasons=out.reasons)
