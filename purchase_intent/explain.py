"""Why this score? Reasons per prediction, one format for every model.

    purchase-intent explain --run lightgbm --user u123 [--at 2017-12-03] [--top 5]

A reason is a dict ``{"feature" | "group", "contribution", "text", ...}``: one tabular feature or
one event of the user's history, its signed contribution to the score in log-odds (positive
raises the probability of buying) and a sentence a marketer understands ("added 2 items to the
cart in the last 24 hours").

The numbers come from the model itself: every estimator's ``contributions(X, *, n_steps)``
returns a :class:`~purchase_intent.models.attribution.Contributions` (per feature, per event,
and the base they are measured from; see that module for each model's method). In every case
base + sum(contributions) equals the model's logit (up to the integral's error for integrated
gradients); a calibrated model's probability is a monotone map of that logit. This module turns
them into reasons and summaries and never asks which model it holds, except for the ``ensemble``
run: its contributions are the mean of its members' over the union of their features and events,
0 where a member does not use one (see ``_attribute_ensemble``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from . import runs
from .privacy import earlier_pseudonyms, pseudonym_for, workspace_key
from .reason_text import event_text, feature_text
from .sequences import SEQUENCE_FIELDS, SequenceVocab, time_edges
from .vocabulary import EVENT_CODES
from .workspace import as_workspace

EVENT_NAMES = {v: k for k, v in EVENT_CODES.items()}  # token code -> canonical event name


@dataclass
class Attribution:
    """Contributions of a batch of N examples, in log-odds.

    features : (N, F) one column per tabular feature, in ``feature_names`` order.
    base : (N,) the reference logit (bias / expected value / logit of the empty-history baseline).
    events : (N, T) per event position (right-aligned like the sequences) or None for baselines.
    tokens : the sequence arrays the events were read from (event codes, dt_cutoff buckets, mask)
        and ``time_edges``, the vocab's dt_cutoff bucket edges in seconds.
    """

    feature_names: list[str]
    features: np.ndarray
    base: np.ndarray
    events: Optional[np.ndarray] = None
    tokens: Optional[dict[str, np.ndarray]] = None
    values: Optional[pd.DataFrame] = None  # an ensemble's feature values (the union of its members' inputs)

    def total(self) -> np.ndarray:
        """base + all contributions: the model's logit, shape (N,)."""
        s = self.base + self.features.sum(axis=1)
        return s + self.events.sum(axis=1) if self.events is not None else s


# ---------------------------------------------------------------------------------------------
# attribution
def _tabular(X: Any) -> pd.DataFrame | np.ndarray:
    return X["tabular"] if isinstance(X, dict) else X


def attribute(meta: dict, model: Any, X: Any, ig_steps: int = 32) -> Attribution:
    """Per-example contributions of run ``meta``'s ``model`` for inputs ``X`` (see module doc).

    Parameters
    ----------
    meta : the run's run.json (``feature_names``).
    model : the loaded estimator (anything with ``contributions(X, *, n_steps)``).
    X : what the model's ``predict_proba`` eats (feature frame, or the transformer's dict).
    ig_steps : integration steps of approximate attributions (integrated gradients); exact
        methods ignore it.
    """
    if isinstance(model, runs.EnsembleModel):
        return _attribute_ensemble(meta, model, X, ig_steps)
    # a model on a pretrained encoder's embedding adds one column per embedding dimension
    names = list(meta["feature_names"]) + list(getattr(model, "extra_names_", []))
    c = model.contributions(X, n_steps=ig_steps)
    if c.features.shape[1] != len(names):
        raise RuntimeError(f"contributions have {c.features.shape[1]} feature columns, expected {len(names)}")
    tokens = None if c.events is None else sequence_tokens(X, runs.model_vocab(model))
    values = model.explain_frame(X, list(meta["feature_names"])) if hasattr(model, "explain_frame") else None
    return Attribution(feature_names=names, features=c.features, base=c.base, events=c.events, tokens=tokens,
                       values=values)


def _attribute_ensemble(meta: dict, model: runs.EnsembleModel, X: list, ig_steps: int) -> Attribution:
    """The mean of the members' attributions (each member's contributions in its own log-odds).

    Members of different kinds see different inputs, so the ensemble's features are the union of
    its members' (``meta["feature_names"]``) and its events those of its sequence member: each
    member contributes 0 to a feature or event it does not use, and every column is the sum over
    members divided by the number of members. base + sum(contributions) is then the mean of the
    members' logits (not the logit of the mean probability the ensemble scores with; both rank
    the same way for one member and move together for all).
    """
    k = len(model.members)
    parts = [attribute(m.meta, m.model, x, ig_steps=ig_steps) for m, x in zip(model.members, X)]
    names = list(meta["feature_names"])  # then the columns only a member has (a pretrained embedding's)
    names += [f for a in parts for f in a.feature_names if f not in set(names)]
    names = list(dict.fromkeys(names))
    col = {n: j for j, n in enumerate(names)}
    n = len(parts[0].base)
    feats = np.zeros((n, len(names)))
    base = np.zeros(n)
    events, tokens = None, None
    values = pd.DataFrame(index=range(n))
    for m, x, a in zip(model.members, X, parts):
        tab = (a.values if a.values is not None else _tabular_frame(x, list(m.meta["feature_names"])))
        tab = tab.reset_index(drop=True)
        values = values.join(tab[[c for c in tab.columns if c not in values.columns]])
    for a in parts:
        feats[:, [col[f] for f in a.feature_names]] += a.features
        base += a.base
        if a.events is not None:
            if events is None:
                events, tokens = np.zeros_like(a.events, dtype=np.float64), a.tokens
            elif events.shape != a.events.shape or not np.array_equal(tokens["event"], a.tokens["event"]):
                raise RuntimeError("ensemble members read different event sequences; their event "
                                   "contributions cannot be averaged")
            events += a.events
    return Attribution(feature_names=names, features=feats / k, base=base / k,
                       events=None if events is None else events / k, tokens=tokens,
                       values=values.reindex(columns=names).astype("float64"))


def sequence_tokens(X: dict, vocab: Optional[SequenceVocab]) -> dict[str, np.ndarray]:
    """What reasons read of a sequence input: event codes, dt_cutoff buckets, mask and the bucket edges."""
    cfg = (vocab if isinstance(vocab, SequenceVocab) else SequenceVocab()).cfg
    tokens = {k: np.asarray(X[k]) for k in ("event", "dt_cutoff", "mask")}
    tokens["time_edges"] = time_edges(cfg)
    return tokens


# ---------------------------------------------------------------------------------------------
# reasons
def _tabular_frame(X: Any, names: list[str]) -> pd.DataFrame:
    tab = _tabular(X)
    return tab if isinstance(tab, pd.DataFrame) else pd.DataFrame(np.asarray(tab), columns=names)


def reasons(attr: Attribution, X: Any, top: int = 5, events: Optional[list[pd.DataFrame]] = None
            ) -> list[list[dict]]:
    """The ``top`` largest contributions (by absolute value) of each example, as reason dicts.

    Parameters
    ----------
    attr : from :func:`attribute`.
    X : the same model input (the raw feature values go into the sentences).
    events : optional, per example the raw events of its sequence (columns ts, event, item_id,
        category, hours_before), oldest first, aligned with the right-aligned mask; without them
        events are described from their tokens (type and approximate time).
    """
    tab = attr.values if attr.values is not None else _tabular_frame(X, attr.feature_names)
    out = []
    for i in range(len(attr.base)):
        cands = [(c, "feature", j) for j, c in enumerate(attr.features[i])]
        if attr.events is not None:
            cands += [(c, "event", t) for t, c in enumerate(attr.events[i]) if attr.tokens["mask"][i, t]]
        cands.sort(key=lambda r: -abs(r[0]))
        row = []
        for c, kind, j in cands[:top]:
            if kind == "feature":
                name = attr.feature_names[j]
                value = float(tab.iat[i, j])
                row.append({"feature": name, "contribution": float(c), "text": feature_text(name, value),
                            "value": value if math.isfinite(value) else None})
            else:
                row.append({"group": "event", "contribution": float(c), **_event_reason(attr, events, i, j)})
        out.append(row)
    return out


def _event_reason(attr: Attribution, events: Optional[list[pd.DataFrame]], i: int, t: int) -> dict:
    mask = attr.tokens["mask"][i]
    rank = int(mask[t:].sum()) - 1  # 0 = the most recent event
    code = int(attr.tokens["event"][i, t])
    name = EVENT_NAMES.get(code, "other")
    if events is not None and rank < len(events[i]):
        e = events[i].iloc[len(events[i]) - 1 - rank]
        return {"event": str(e["event"]), "ts": str(e["ts"]), "item_id": e["item_id"], "recency_rank": rank,
                "text": event_text(str(e["event"]), float(e["hours_before"]), e["item_id"], e["category"])}
    hours = _bucket_hours(attr.tokens, int(attr.tokens["dt_cutoff"][i, t]))
    text = event_text(name, hours).replace(" ago", " ago (about)") if hours is not None else event_text(name, 0)
    return {"event": name, "recency_rank": rank, "text": text}


def _bucket_hours(tokens: dict, bucket: int) -> Optional[float]:
    """Geometric middle (hours) of a dt_cutoff bucket of the sequence vocab."""
    edges = tokens.get("time_edges")
    if edges is None or bucket <= 0:
        return None
    if bucket - 1 >= len(edges):  # the last bucket: older than the last edge
        return float(edges[-1]) / 3600
    lo = 0.5 if bucket == 1 else edges[bucket - 2]
    return math.sqrt(lo * edges[bucket - 1]) / 3600


def explain_inputs(meta: dict, model: Any, X: Any, top: int = 5, events: Optional[list[pd.DataFrame]] = None,
                   ig_steps: int = 32) -> list[list[dict]]:
    """Reasons for each row of model input ``X`` (as built by ``runs.inputs_for_examples``).

    This is what the API (``?explain=true``) and batch scoring call. Returns one list of at most
    ``top`` reason dicts per example, largest absolute contribution first.
    """
    return reasons(attribute(meta, model, X, ig_steps=ig_steps), X, top=top, events=events)


def sequence_events(con, examples: pd.DataFrame, max_seq_len: int) -> list[pd.DataFrame]:
    """Raw events of each example's sequence (same selection and order as ``sequences``), oldest first."""
    ex = examples[["user_id", "cutoff"]].reset_index(drop=True).copy()
    ex["example_id"] = np.arange(len(ex), dtype=np.int64)
    con.register("_pi_explain_examples", ex)
    df = con.execute(
        f"""
        SELECT * FROM (
          SELECT x.example_id, e.ts, e.event, e.item_id, e.category,
                 (epoch_us(x.cutoff) - epoch_us(e.ts)) / 3.6e9 AS hours_before,
                 row_number() OVER (PARTITION BY x.example_id ORDER BY e.ts DESC, e.event DESC,
                                    e.item_id DESC, e.category DESC, e.price DESC) AS rn
          FROM _pi_explain_examples x JOIN events e ON e.user_id = x.user_id AND e.ts < x.cutoff)
        WHERE rn <= {int(max_seq_len)} ORDER BY example_id, rn DESC"""
    ).df()
    con.unregister("_pi_explain_examples")
    groups = dict(tuple(df.groupby("example_id")))
    empty = df.iloc[:0]
    return [groups.get(i, empty).reset_index(drop=True) for i in range(len(ex))]


# ---------------------------------------------------------------------------------------------
# global view
def global_importance(attr: Attribution) -> pd.DataFrame:
    """Mean absolute contribution per feature (and per event type for sequence models), largest first.

    Returns a frame with columns name, kind ("feature" / "event type"), mean_abs, mean (signed).
    """
    rows = [{"name": n, "kind": "feature", "mean_abs": float(np.abs(attr.features[:, j]).mean()),
             "mean": float(attr.features[:, j].mean())} for j, n in enumerate(attr.feature_names)]
    if attr.events is not None:
        by_type = attribution_by_event_type(attr)
        rows += [{"name": f"events: {k}", "kind": "event type", "mean_abs": v["mean_abs_per_example"],
                  "mean": v["mean_per_example"]} for k, v in by_type.items()]
    return pd.DataFrame(rows).sort_values("mean_abs", ascending=False, ignore_index=True)


def attribution_by_event_type(attr: Attribution) -> dict[str, dict]:
    """Per event type: summed attribution per example (mean signed / mean absolute) and per event."""
    mask, codes, ev = attr.tokens["mask"], attr.tokens["event"], attr.events
    n = max(len(ev), 1)
    out = {}
    for code, name in EVENT_NAMES.items():
        sel = mask & (codes == code)
        if not sel.any():
            continue
        per_example = np.where(sel, ev, 0.0).sum(axis=1)  # (N,)
        out[name] = {"n_events": int(sel.sum()), "mean_per_example": float(per_example.sum() / n),
                     "mean_abs_per_example": float(np.abs(per_example).sum() / n),
                     "mean_per_event": float(ev[sel].mean())}
    return out


TIME_BINS_HOURS = (1, 6, 24, 72, 168, 672)  # 1h, 6h, 1d, 3d, 7d, 28d; the rest is "older"


def attribution_by_time(attr: Attribution, events: Optional[list[pd.DataFrame]] = None) -> list[dict]:
    """Attribution by time before the cutoff: per bin, mean summed attribution per example and per event.

    Uses the raw events' ages when given, else the middle of each event's dt_cutoff bucket.
    """
    mask, ev = attr.tokens["mask"], attr.events
    hours = np.full(mask.shape, np.nan)
    for i in range(mask.shape[0]):
        pos = np.flatnonzero(mask[i])
        if events is not None and len(events[i]) == len(pos):
            hours[i, pos] = events[i]["hours_before"].to_numpy()
        else:
            hours[i, pos] = [_bucket_hours(attr.tokens, int(b)) or 0.0 for b in attr.tokens["dt_cutoff"][i, pos]]
    edges = (0,) + TIME_BINS_HOURS + (math.inf,)
    labels = ["< 1 hour", "1-6 hours", "6-24 hours", "1-3 days", "3-7 days", "7-28 days", "older"]
    n = max(len(ev), 1)
    out = []
    for lo, hi, label in zip(edges[:-1], edges[1:], labels):
        sel = mask & (hours >= lo) & (hours < hi)
        out.append({"bin": label, "n_events": int(sel.sum()),
                    "mean_per_example": float(np.where(sel, ev, 0.0).sum() / n),
                    "mean_per_event": float(ev[sel].mean()) if sel.any() else None})
    return out


# ---------------------------------------------------------------------------------------------
# one user, from the command line
def _resolve_user(con, workspace, user_id: str) -> str:
    """The stored (pseudonymised) id: ``user_id`` itself if it has events, else its pseudonym."""
    def known(uid: str) -> bool:
        return con.execute("SELECT count(*) FROM (SELECT 1 FROM events WHERE user_id = ? LIMIT 1)",
                           [uid]).fetchall()[0][0] > 0

    if known(user_id):
        return user_id
    pseudo = pseudonym_for(workspace, [user_id]).get(user_id)
    if pseudo is not None and known(pseudo):
        return pseudo
    for earlier in earlier_pseudonyms(user_id, workspace_key(workspace)):  # as a file read earlier stored it
        if known(earlier):
            return earlier
    prefix = user_id.lower()
    if 12 <= len(prefix) < 32 and all(c in "0123456789abcdef" for c in prefix):  # the report's 12-character ones
        found = [r[0] for r in con.execute("SELECT DISTINCT user_id FROM events WHERE starts_with(user_id, ?) "
                                           "LIMIT 2", [prefix]).fetchall()]
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{user_id!r} begins more than one user's pseudonym: give more of it")
    raise ValueError(f"user {user_id!r} has no events in the workspace (neither as given, nor pseudonymised, nor as "
                     f"the start of a pseudonym, of 12 or more characters)")


def explain_user(run: str, user_id: str, at: Any = None, workspace=None, top: int = 5, ig_steps: int = 32) -> dict:
    """Score one user at time ``at`` (default: end of the data) with run ``run`` and give the reasons.

    Returns ``{"user_id", "at", "probability", "logit", "base", "model", "version", "active", "reasons"}``
    (``active``: an event in the lookback before ``at``, as the API says and batch scoring requires);
    ``user_id`` may be the raw id (looked up through the workspace's pseudonymisation key) or the
    stored pseudonym. User task runs only (a session run needs the session, see the API).
    """
    ws = as_workspace(workspace)
    loaded = runs.load_run(run, ws)
    meta, model = loaded.meta, loaded.model
    if meta["label_config"].get("task", "user") != "user":
        raise ValueError("explain --user needs a user-task run; session runs are explained through the API")
    con = ws.connect()
    uid = _resolve_user(con, ws, str(user_id))
    cutoff = pd.Timestamp(runs.resolve_cutoff(con, at))
    first, last = con.execute("SELECT min(ts), max(ts) FILTER (WHERE ts < ?) FROM events WHERE user_id = ?",
                              [cutoff.to_pydatetime(), uid]).fetchall()[0]
    if first is not None and pd.Timestamp(first) >= cutoff:  # as score: no history, nothing to explain
        raise ValueError(f"user {user_id!r} has no event before {cutoff.isoformat()} (the first is at "
                         f"{pd.Timestamp(first).isoformat()}): nothing to score or explain at that time")
    ex = pd.DataFrame({"user_id": [uid], "cutoff": [cutoff]})
    ex["cutoff"] = ex["cutoff"].astype("datetime64[us]")
    X = runs.inputs_for_examples(meta, model, con, ex)
    p = float(np.asarray(model.predict_proba(X))[0, 1])
    attr = attribute(meta, model, X, ig_steps=ig_steps)
    events = None if attr.events is None else sequence_events(con, ex, attr.tokens["mask"].shape[1])
    # as the API's "active": an event in the lookback before the cutoff (batch scoring ranks active users only)
    active = last is not None and pd.Timestamp(last) >= cutoff - loaded.lookback
    return {"user_id": uid, "at": cutoff.isoformat(), "probability": p, "logit": float(attr.total()[0]),
            "base": float(attr.base[0]), "model": meta["model"], "version": meta.get("version"), "active": active,
            "reasons": reasons(attr, X, top=top, events=events)[0]}


def format_explanation(e: dict) -> str:
    """The text ``purchase-intent explain`` prints."""
    lines = [f"user {e['user_id']} at {e['at']}: probability of buying {e['probability']:.1%} "
             f"({e['model']}, {e['version']})",
             f"reference log-odds {e['base']:+.3f}; the reasons below move it (log-odds, + raises the score):"]
    if e.get("active") is False:
        lines.insert(1, "note: no event in the run's lookback before this time: batch scores (`score`) leave the "
                        "user out")
    for r in e["reasons"]:
        what = r.get("feature") or f"{r.get('event', 'event')} event"
        lines.append(f"  {r['contribution']:+7.3f}  {r['text']}  [{what}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# faithfulness of the event attributions
def remove_events(X: dict, remove: np.ndarray) -> dict:
    """A copy of sequence input ``X`` without the events where ``remove`` (N, T) is True.

    The remaining events are packed to the right again, so each moves up in recency rank as if
    the removed events had never happened (their tokens, including time gaps, are kept as they were).
    """
    mask = np.asarray(X["mask"], dtype=bool)
    keep = mask & ~remove
    seq = [k for k in (*SEQUENCE_FIELDS, "mask") if k in X]
    out = {k: (np.zeros_like(X[k]) if k in seq else X[k]) for k in X}
    T = mask.shape[1]
    for i in range(mask.shape[0]):
        src = np.flatnonzero(keep[i])
        dst = np.arange(T - len(src), T)
        for k in seq:
            out[k][i, dst] = X[k][i, src]
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def faithfulness(model: Any, X: dict, attr: Attribution, ks: tuple[int, ...] = (1, 2, 3, 5, 10), seed: int = 0
                 ) -> dict:
    """Score drop (log-odds) after removing the k events of highest attribution vs k random events.

    For each k, over the examples with more than k events: mean of ``logit(p) - logit(p without
    the events)``. A faithful attribution gives a larger drop for the top events than for random ones.

    Returns ``{"k": [...], "n": [...], "top": [...], "random": [...], "top_points", "random_points"}``.
    """
    rng = np.random.default_rng(seed)
    mask = np.asarray(X["mask"], dtype=bool)
    n_events = mask.sum(axis=1)
    def score(X_: dict) -> np.ndarray:  # uncalibrated log-odds when the model has them
        if hasattr(model, "decision_function"):
            return np.asarray(model.decision_function(X_), dtype=np.float64)
        return _logit(np.asarray(model.predict_proba(X_))[:, 1])

    base = score(X)
    ranked = np.where(mask, attr.events, -np.inf)
    order_top = np.argsort(-ranked, axis=1, kind="stable")  # real events first, highest attribution first
    noise = np.where(mask, rng.random(mask.shape), -np.inf)
    order_rand = np.argsort(-noise, axis=1, kind="stable")
    out = {"k": [], "n": [], "top": [], "random": []}
    for k in ks:
        rows = np.flatnonzero(n_events > k)
        if len(rows) == 0:
            continue
        drops = []
        for order in (order_top, order_rand):
            remove = np.zeros_like(mask)
            np.put_along_axis(remove, order[:, :k], True, axis=1)
            sub = {key: (v[rows] if isinstance(v, np.ndarray) and v.shape[:1] == mask.shape[:1] else v)
                   for key, v in remove_events(X, remove & mask).items()}
            drops.append(float((base[rows] - score(sub)).mean()))
        out["k"].append(k)
        out["n"].append(int(len(rows)))
        out["top"].append(drops[0])
        out["random"].append(drops[1])
    out["top_points"] = [[k, v] for k, v in zip(out["k"], out["top"])]
    out["random_points"] = [[k, v] for k, v in zip(out["k"], out["random"])]
    return out
