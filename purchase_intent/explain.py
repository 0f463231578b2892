"""Why this score? Reasons per prediction, one format for every model.

    purchase-intent explain --run lightgbm --user u123 [--at 2017-12-03] [--top 5]

A reason is a dict ``{"feature" | "group", "contribution", "text", ...}``: one tabular feature or
one event of the user's history, its signed contribution to the score in log-odds (positive
raises the probability of buying) and a sentence a marketer understands ("added 2 items to the
cart in the last 24 hours"). Contributions are measured against a reference:

- logistic regression: ``coef * standardised value`` (reference: the mean training example);
- LightGBM: TreeSHAP ``pred_contrib`` (reference: the expected raw score over the training data);
- Transformer: integrated gradients (Captum) from a zero embedding for every event (the mask
  kept) and mean tabular features to the input, over the event embeddings and the tabular inputs; the event
  attribution is summed over the embedding dimension, so each reason is one event or one feature.

In every case base + sum(contributions) equals the model's logit (up to the integral's error for
integrated gradients); a calibrated model's probability is a monotone map of that logit.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from .reason_text import event_text, feature_text
from .sequences import EVENT_CODES

EVENT_NAMES = {v: k for k, v in EVENT_CODES.items()}  # token code -> canonical event name


@dataclass
class Attribution:
    """Contributions of a batch of N examples, in log-odds.

    features : (N, F) one column per tabular feature, in ``feature_names`` order.
    base : (N,) the reference logit (bias / expected value / logit of the empty-history baseline).
    events : (N, T) per event position (right-aligned like the sequences) or None for baselines.
    tokens : the sequence arrays the events were read from (event codes, dt_cutoff buckets, mask).
    """

    feature_names: list[str]
    features: np.ndarray
    base: np.ndarray
    events: Optional[np.ndarray] = None
    tokens: Optional[dict[str, np.ndarray]] = None

    def total(self) -> np.ndarray:
        """base + all contributions: the model's logit, shape (N,)."""
        s = self.base + self.features.sum(axis=1)
        return s + self.events.sum(axis=1) if self.events is not None else s


# ---------------------------------------------------------------------------------------------
# attribution per model type
def _tabular(X: Any) -> pd.DataFrame | np.ndarray:
    return X["tabular"] if isinstance(X, dict) else X


def attribute(meta: dict, model: Any, X: Any, ig_steps: int = 32) -> Attribution:
    """Per-example contributions of run ``meta``'s ``model`` for inputs ``X`` (see module doc).

    Parameters
    ----------
    meta : the run's run.json (``model``, ``feature_names``).
    model : the loaded estimator.
    X : what the model's ``predict_proba`` eats (feature frame, or the transformer's dict).
    ig_steps : integration steps for integrated gradients (transformer only).
    """
    names = list(meta["feature_names"])
    if isinstance(X, dict):
        return integrated_gradients(model, X, names, n_steps=ig_steps)
    C = np.asarray(model.contributions(X), dtype=np.float64)  # (N, F+1), last column = bias
    if C.shape[1] != len(names) + 1:
        raise RuntimeError(f"contributions have {C.shape[1]} columns, expected {len(names) + 1}")
    return Attribution(feature_names=names, features=C[:, :-1], base=C[:, -1])


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
    tab = _tabular_frame(X, attr.feature_names)
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
    edges = tokens.get("_time_edges")
    if edges is None or bucket <= 0:
        return None
    if bucket - 1 >= len(edges):  # the last bucket: older than the last edge
        return float(edges[-1]) / 3600
    lo = 0.5 if bucket == 1 else edges[bucket - 2]
    return math.sqrt(lo * edges[bucket - 1]) / 3600


def explain_inputs(meta: dict, model: Any, X: Any, top: int = 5, events: Optional[list[pd.DataFrame]] = None,
                   ig_steps: int = 32) -> list[list[dict]]:
    """Reasons for each row of model input ``X`` (as built by ``pipeline.inputs_for_examples``).

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
    from .privacy import pseudonym_for

    pseudo = pseudonym_for(workspace, [user_id]).get(user_id)
    if pseudo is not None and known(pseudo):
        return pseudo
    raise ValueError(f"user {user_id!r} has no events in the workspace (neither as given nor pseudonymised)")


def explain_user(run: str, user_id: str, at: Any = None, workspace=None, top: int = 5, ig_steps: int = 32) -> dict:
    """Score one user at time ``at`` (default: end of the data) with run ``run`` and give the reasons.

    Returns ``{"user_id", "at", "probability", "logit", "base", "model", "version", "reasons"}``;
    ``user_id`` may be the raw id (looked up through the workspace's pseudonymisation key) or the
    stored pseudonym. User task runs only (a session run needs the session, see the API).
    """
    from . import pipeline
    from .score import resolve_cutoff
    from .workspace import Workspace

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    meta, model = pipeline.load_run(run, ws)
    if meta["label_config"].get("task", "user") != "user":
        raise ValueError("explain --user needs a user-task run; session runs are explained through the API")
    con = ws.connect()
    uid = _resolve_user(con, ws, str(user_id))
    cutoff = pd.Timestamp(resolve_cutoff(con, at))
    ex = pd.DataFrame({"user_id": [uid], "cutoff": [cutoff]})
    ex["cutoff"] = ex["cutoff"].astype("datetime64[us]")
    X = pipeline.inputs_for_examples(meta, model, con, ex)
    p = float(np.asarray(model.predict_proba(X))[0, 1])
    attr = attribute(meta, model, X, ig_steps=ig_steps)
    events = None
    if isinstance(X, dict):
        events = sequence_events(con, ex, X["mask"].shape[1])
    return {"user_id": uid, "at": cutoff.isoformat(), "probability": p, "logit": float(attr.total()[0]),
            "base": float(attr.base[0]), "model": meta["model"], "version": meta.get("version"),
            "reasons": reasons(attr, X, top=top, events=events)[0]}


def format_explanation(e: dict) -> str:
    """The text ``purchase-intent explain`` prints."""
    lines = [f"user {e['user_id']} at {e['at']}: probability of buying {e['probability']:.1%} "
             f"({e['model']}, {e['version']})",
             f"reference log-odds {e['base']:+.3f}; the reasons below move it (log-odds, + raises the score):"]
    for r in e["reasons"]:
        what = r.get("feature") or f"{r.get('event', 'event')} event"
        lines.append(f"  {r['contribution']:+7.3f}  {r['text']}  [{what}]")
    return "\n".join(lines)


def cmd_explain(a: argparse.Namespace) -> int:
    e = explain_user(a.run, a.user, at=a.at, workspace=a.workspace, top=a.top, ig_steps=a.ig_steps)
    print(json.dumps(e, indent=2, default=str) if a.json else format_explanation(e))
    return 0


def add_explain_parser(sub) -> argparse.ArgumentParser:
    """Register ``purchase-intent explain`` on the CLI's subparsers."""
    p = sub.add_parser("explain", help="why a user gets their score: the top reasons, in log-odds")
    p.add_argument("--run", required=True, help="run name under <workspace>/runs/ or a path to a run directory")
    p.add_argument("--user", required=True, help="user id (raw: looked up with the workspace key; or the pseudonym)")
    p.add_argument("--at", help="scoring time T, ISO 8601 or epoch seconds (UTC); default: end of the data")
    p.add_argument("--top", type=int, default=5, help="number of reasons (default 5)")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps (transformer)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_explain)
    return p


# ---------------------------------------------------------------------------------------------
# Transformer: integrated gradients
def module_integrated_gradients(net, batch: dict, n_steps: int = 32, internal_batch_size: Optional[int] = None
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integrated gradients of a ``BehaviourTransformer`` for one batch of tensors.

    Baseline: every event's summed embedding at zero (the mask and recency ranks are kept) and
    the tabular vector at 0 (the training mean, as it is standardised). Only the inputs the
    network uses are attributed (a features-only or sequence-only model has one).

    A ``SeedEnsemble`` (logit = mean of its members' logits) gets the mean of its members'
    attributions: each member has its own embeddings to move from zero, and the completeness of
    each member's attributions carries over to the mean.

    Returns
    -------
    (tabular (B, F), events (B, T) or None, base (B,)) as float64 arrays, in log-odds;
    base + sums = logit.
    """
    import torch

    if hasattr(net, "members"):
        parts = [module_integrated_gradients(m, batch, n_steps, internal_batch_size) for m in net.members]
        tabular, events, base = (None if parts[0][i] is None else np.mean([p[i] for p in parts], axis=0)
                                 for i in range(3))
        return tabular, events, base
    try:
        from captum.attr import IntegratedGradients
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError("Transformer explanations need captum: pip install 'purchase-intent[explain]'") from e
    net.eval()
    cfg = net.cfg
    B = (batch["mask"] if cfg.use_sequence else batch["tabular"]).shape[0]
    with torch.no_grad():
        inputs = []
        if cfg.use_sequence:  # the summed field embeddings, moved from zero to their value
            inputs.append(sum(net.embed[f](batch[f].long()) for f in net.fields))  # (B, T, D)
        if cfg.use_tabular:
            inputs.append(batch["tabular"].float())  # (B, F)

    def logit(*xs):  # captum repeats the inputs n_steps times along the batch; the mask must follow
        rows = {"mask": batch["mask"].repeat(xs[0].shape[0] // B, 1)} if cfg.use_sequence else {}
        return net.logits(rows, emb=xs[0] if cfg.use_sequence else None, tab=xs[-1] if cfg.use_tabular else None)

    zeros = tuple(torch.zeros_like(x) for x in inputs)
    attrs = IntegratedGradients(logit).attribute(tuple(inputs), baselines=zeros, n_steps=n_steps,
                                                 internal_batch_size=internal_batch_size)
    with torch.no_grad():
        base = logit(*zeros)
    events = attrs[0].sum(dim=-1).detach().double().numpy() if cfg.use_sequence else None
    tabular = attrs[-1].detach().double().numpy() if cfg.use_tabular else np.zeros((B, 0))
    return tabular, events, base.detach().double().numpy()


def _net_and_batch(model: Any, X: dict):
    """The estimator's ``BehaviourTransformer`` and the tensors it eats for ``X`` (standardised tabular).

    Uses the estimator's own conversion (``TransformerClassifier._arrays`` + ``_collate``, or a
    ``to_batch(X)`` method) so that explanations see exactly what ``predict_proba`` sees.
    """
    import torch.nn as nn

    net = next((getattr(model, a) for a in ("model_", "module_") if isinstance(getattr(model, a, None), nn.Module)),
               None)
    if net is not None and hasattr(model, "to_batch"):
        return net, model.to_batch(X)
    if net is not None and hasattr(model, "_arrays") and hasattr(model, "_collate"):
        arrays = model._arrays(X)
        n = len(next(iter(arrays.values())))
        return net, model._collate(arrays, np.arange(n))
    raise TypeError(f"{type(model).__name__} exposes no fitted BehaviourTransformer and batch conversion: "
                    "cannot compute integrated gradients")


def integrated_gradients(model: Any, X: dict, feature_names: list[str], n_steps: int = 32,
                         internal_batch_size: int = 64) -> Attribution:
    """:class:`Attribution` of a sequence estimator for input ``X`` by integrated gradients.

    The batch is trimmed to its longest real sequence (leading all-padding columns carry no
    attribution) and the event attributions are padded back to ``X``'s width.
    """
    import torch

    from .sequences import _time_edges, SequenceVocab

    net, batch = _net_and_batch(model, X)
    mask = batch.get("mask")  # absent for a features-only model
    trimmed = batch
    if mask is not None:
        T = mask.shape[1]
        first = int(torch.nonzero(mask.any(dim=0)).min()) if bool(mask.any()) else T - 1
        trimmed = {k: (v[:, first:] if v.dim() == 2 and v.shape == mask.shape else v) for k, v in batch.items()}
    n = (mask if mask is not None else batch["tabular"]).shape[0]
    tab, ev, base = module_integrated_gradients(net, trimmed, n_steps=n_steps,
                                                internal_batch_size=max(internal_batch_size, n))
    N, T_x = np.asarray(X["mask"]).shape
    events = np.zeros((N, T_x))
    if ev is not None:
        events[:, T_x - ev.shape[1]:] = ev
    if tab.shape[1] == 0:
        tab = np.zeros((N, len(feature_names)))
    vocab = getattr(model, "vocab_", None) or getattr(model, "vocab", None)
    tokens = {k: np.asarray(X[k]) for k in ("event", "dt_cutoff", "mask")}
    tokens["_time_edges"] = _time_edges(vocab.cfg if isinstance(vocab, SequenceVocab) else SequenceVocab().cfg)
    return Attribution(feature_names=list(feature_names), features=tab, base=base, events=events, tokens=tokens)


# ---------------------------------------------------------------------------------------------
# faithfulness of the event attributions
def remove_events(X: dict, remove: np.ndarray) -> dict:
    """A copy of sequence input ``X`` without the events where ``remove`` (N, T) is True.

    The remaining events are packed to the right again, so each moves up in recency rank as if
    the removed events had never happened (their tokens, including time gaps, are kept as they were).
    """
    from .sequences import SEQUENCE_FIELDS

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
