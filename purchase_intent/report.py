"""The HTML report (``purchase-intent report``): one self-contained file that opens offline.

Reads only workspace files (manifest, events, examples, each run's run.json, metrics.json and
predictions.parquet) and each run's model, to explain a sample of test examples; the page
itself (styles, chart script) is ``report_page``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import explain, runs, storage
from .config import MIN_USERS
from .evaluate import reliability_curve
from .privacy import KEY_ENV, below_threshold, check_min_users, count_text
from .report_page import Page, cards, esc, interval, num, table
from .workspace import Workspace, as_workspace, atomic_write_text

MAX_POINTS = 200  # points per curve
N_EXPLAIN_SAMPLE = {"logreg": 2000, "lightgbm": 2000, "transformer": 200}  # test examples for importance


# ---------------------------------------------------------------------------------------------
# curves (the metrics themselves are evaluate.py's; these are their plotted shapes)
def _thin(*cols: np.ndarray) -> list[list[float]]:
    n = len(cols[0])
    idx = np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int)) if n else np.zeros(0, int)
    rows = [[float(c[i]) for c in cols] for i in idx]
    return [[round(v, 5) for v in r] for r in rows if all(math.isfinite(v) for v in r)]


def curves(y: np.ndarray, p: np.ndarray) -> dict[str, list]:
    """ROC, precision-recall, cumulative gain and lift as thinned [x, y] point lists."""
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order].astype(float), p[order]
    last = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1]  # last index of each tied score
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    P, N = max(y.sum(), 1), max(len(y) - y.sum(), 1)
    k = (last + 1) / len(y)  # share of users targeted
    return {
        "roc": _thin(np.r_[0, fp / N], np.r_[0, tp / P]),
        "pr": _thin(tp / P, tp / (tp + fp)),
        "gain": _thin(np.r_[0, k], np.r_[0, tp / P]),
        "lift": _thin(k, (tp / P) / k),
    }


def histogram(p: np.ndarray, y: np.ndarray, bins: int = 25) -> dict:
    """Score distribution per class: share of each class's examples per probability bin."""
    edges = np.linspace(0, max(float(p.max()) if len(p) else 1.0, 1e-6), bins + 1)
    mids = (edges[:-1] + edges[1:]) / 2
    out = {}
    for label, name in ((1, "buyers"), (0, "non-buyers")):
        h = np.histogram(p[y == label], edges)[0].astype(float)
        out[name] = [[round(float(m), 5), round(float(v), 5)] for m, v in zip(mids, h / max(h.sum(), 1))]
    return out


# ---------------------------------------------------------------------------------------------
# sections
def _data_section(page: Page, ws: Workspace, k: int) -> None:
    page.section("data", "The data")
    manifest = ws.read_manifest()
    con = ws.connect()
    s = con.execute("""SELECT count(*), count(DISTINCT user_id), count(DISTINCT session_id), count(DISTINCT item_id),
                              min(ts), max(ts) FROM events""").fetchall()[0]
    page.add(cards([("events", f"{s[0]:,}"), ("users", count_text(s[1], s[1], k)),
                    ("sessions", f"{s[2]:,}" if s[2] else "from gaps"), ("items", f"{s[3]:,}"),
                    ("first event (UTC)", str(s[4])[:16]), ("last event (UTC)", str(s[5])[:16])]))
    daily = con.execute("""SELECT CAST(ts AS DATE) AS day, event, count(*) AS n FROM events
                           GROUP BY ALL ORDER BY day""").df()
    epoch = pd.Timestamp("1970-01-01")
    daily["x"] = (pd.to_datetime(daily["day"]) - epoch).dt.days
    series = [{"name": ev, "points": g[["x", "n"]].astype(float).values.tolist()}
              for ev, g in daily.groupby("event", sort=False)]
    series.sort(key=lambda se: -sum(p[1] for p in se["points"]))
    page.add('<div class="grid">' + page.chart(
        "Events per day by type", kind="line", series=series, xtype="date", ylog=True, wide=True,
        xlabel="day (UTC, month-day)", ylabel="events per day (log scale)") + "</div>")
    rows = []
    for f in manifest.get("files", []):
        rej = f.get("rejected") or {}
        rows.append([esc(Path(str(f.get("source", "?"))).name), esc(f.get("format", "")), num(f.get("rows_read")),
                     num(f.get("accepted")), num(sum(rej.values())),
                     esc(", ".join(f"{k}: {v:,}" for k, v in sorted(rej.items())) or "none"), num(f.get("filtered"))])
    if rows:
        page.add("<h3>Ingested files and rejected rows</h3>" + table(
            ["file", "format", "rows read", "accepted", "rejected", "rejected by reason", "filtered (time window)"],
            rows) + f'<p class="note">Rejected rows are kept with their reason in '
                    f'<code>{esc(ws.rejects_dir)}</code>.</p>')


def label_text(cfg: dict) -> str:
    """The label definition in one paragraph."""
    if cfg.get("task") == "session":
        gap = cfg.get("session_gap") or "the data's session ids (else 30min of inactivity)"
        prefix = f"the first {cfg['prefix']} events of" if cfg.get("prefix") else "the events so far in"
        return (f"One example per session (sessions: {gap}). The model sees {prefix} the session and the "
                f"user's earlier history; the label is 1 when the session ends with a purchase. "
                f"Periods of {cfg.get('step')} split the data in time.")
    return (f"Every {cfg.get('step')} (at midnight {cfg.get('tz', 'UTC')}) each user with an event in the previous "
            f"{cfg.get('lookback')} is an example. Its label is 1 when the user buys within the next "
            f"{cfg.get('horizon')}. Features and event sequences read only events before the cutoff.")


def _user_counts(ex: pd.DataFrame) -> tuple[int, int]:
    """Distinct users among the buying examples and among the others of ``ex`` (user_id, label)."""
    return (int(ex.loc[ex["label"] == 1, "user_id"].nunique()), int(ex.loc[ex["label"] != 1, "user_id"].nunique()))


def _task_section(page: Page, ws: Workspace, k: int) -> Optional[dict]:
    page.section("task", "Task, split and label")
    info_path = ws.examples_dir / runs.BUILD_JSON
    if not info_path.exists():
        page.add('<p class="note">No examples built yet.</p>')
        return None
    info = json.loads(info_path.read_text())
    page.add(f"<p>{esc(label_text(info['label_config']))}</p>")
    ex = storage.read_frame(ws.examples_dir / runs.EXAMPLES, columns=["user_id", "cutoff", "label", "split"])
    rows, small = [], False
    for split in ("train", "gap", "valid", "test"):
        g = ex[ex["split"] == split]
        if len(g):
            buyers, others = _user_counts(g)
            few = below_threshold(buyers, k) or below_threshold(others, k)
            small |= few
            rows.append([split, str(g["cutoff"].min())[:16], str(g["cutoff"].max())[:16], num(g["cutoff"].nunique()),
                         count_text(len(g), g["user_id"].nunique(), k), count_text(int(g["label"].sum()), buyers, k),
                         "withheld" if few else f"{g['label'].mean():.2%}"])
    page.add(table(["split", "first cutoff", "last cutoff", "cutoffs", "examples", "buyers", "positive rate"], rows))
    if small:
        page.add(f'<p class="note">Thresholds: a count of fewer than {k} users is shown as "&lt; {k}", and a rate '
                 f"over fewer than {k} buyers or non-buyers is withheld (<code>report --min-users</code>).</p>")
    if info["label_config"].get("task", "user") == "user":
        # one example per user and cutoff: a cutoff with fewer than k buyers (or non-buyers) is left out
        counts = ex.groupby("cutoff")["label"].agg(["sum", "size"])
        keep = ~(counts["sum"].map(lambda n: below_threshold(n, k))
                 | (counts["size"] - counts["sum"]).map(lambda n: below_threshold(n, k)))
        if (~keep).any():
            page.add(f'<p class="note">Positive rate per cutoff: {int((~keep).sum())} of {len(keep)} cutoffs with '
                     f"fewer than {k} buyers or non-buyers are left out (thresholds).</p>")
        by = ex[ex["cutoff"].isin(counts.index[keep])].groupby("cutoff")["label"].agg(["mean", "size"]).reset_index()
        x = ((pd.to_datetime(by["cutoff"]) - pd.Timestamp("1970-01-01")).dt.total_seconds() / 86400).tolist()
        series = [{"name": "positive rate", "points": [[a, float(b)] for a, b in zip(x, by["mean"])], "dots": True}]
        page.add('<div class="grid">' + page.chart(
            "Positive rate per cutoff", kind="line", series=series, xtype="date", yfmt="pct", ymin=0,
            xlabel="cutoff (month-day)", ylabel="share of examples that buy") + "</div>")
    page.add('<p class="note">Splits are by time only: train, then (gap), then validation, then test cutoffs; '
             "the gap keeps label windows of train from overlapping the later splits.</p>")
    return info


def _test_user_counts(ws: Workspace, pred: Optional[pd.DataFrame]) -> Optional[tuple[int, int]]:
    """Distinct buying and non-buying users among a run's test predictions (None: not known here)."""
    path = ws.examples_dir / runs.EXAMPLES
    if pred is None or not path.exists():
        return None
    t = pred.loc[pred["split"] == "test", ["example_id", "label"]]
    users = storage.read_frame(path, columns=["example_id", "user_id"])
    return _user_counts(t.merge(users, on="example_id", how="inner"))


def _comparison_section(page: Page, ws: Workspace, names: list[str], k: int) -> dict[str, pd.DataFrame]:
    page.section("models", "Model comparison (test window)")
    rows, preds, few = [], {}, set()
    for r in names:
        m = runs.read_metrics(ws.run_dir(r))
        t = m["test"]
        if (ws.run_dir(r) / runs.PREDICTIONS).exists():
            preds[r] = runs.read_predictions(ws.run_dir(r))
        users = _test_user_counts(ws, preds.get(r))
        n, pos = t.get("n"), t.get("positives")
        if users is None and n is not None and pos is not None:
            users = (pos, n - pos)  # examples bound users from above: the threshold holds at least as strictly
        if users is not None and (below_threshold(users[0], k) or below_threshold(users[1], k)):
            few.add(r)
        paired = (m.get("paired") or {}).get("test")
        delta = (f"{paired['diff']:+.4f} {interval(paired.get('ci'))} vs {esc(m['paired'].get('reference'))}"
                 if paired and paired.get("diff") is not None else "reference" if m["model"] in ("logreg", "lightgbm")
                 else "")
        lift = t.get("lift") or {}
        rows.append([f"<b>{esc(r)}</b>", count_text(n, None if users is None else sum(users), k),
                     count_text(pos, None if users is None else users[0], k),
                     f"{num(t.get('roc_auc'), 4)} {interval(t.get('roc_auc_ci'))}", num(t.get("pr_auc"), 4),
                     num(t.get("log_loss"), 4), num(t.get("brier"), 4), num(t.get("ece"), 4),
                     num(lift.get("top_1pct"), 2), num(lift.get("top_10pct"), 2), delta])
    page.add(table(["model", "n", "buyers", "ROC-AUC [95% CI]", "PR-AUC", "log loss", "Brier", "ECE",
                     "lift top 1%", "lift top 10%", "ΔAUC [95% CI]"], rows))
    page.add('<p class="note">ROC-AUC: the chance that a buyer is scored above a non-buyer (0.5 is chance, 1 a '
             "perfect ranking). PR-AUC: average precision, the share of buyers among those flagged, averaged over "
             "every buyer's rank (chance: the buying rate); it weighs the top of the ranking, where audiences are "
             "drawn. Log loss and Brier (mean squared error of the probability): lower is better, and both judge the "
             "probabilities themselves, not only their order. ECE: the mean gap between predicted and observed "
             "buying rates over 10 equal-size bins of the scores (0 is perfectly calibrated). "
             "Intervals: stratified bootstrap. ΔAUC: paired bootstrap difference to the best "
             "baseline (same resamples for both models). Lift: buyers among the top-scored share divided by "
             "the overall rate.</p>")
    for r in names:
        members = ensemble_members_text(runs.read_metrics(ws.run_dir(r)))
        if members:
            page.add(f'<p class="note"><b>{esc(r)}</b> is an ensemble: the mean of the calibrated probabilities '
                     f"of {esc(members)}; its reasons are the mean of theirs (see those runs).</p>")
    if few:
        page.add(f'<p class="note">Thresholds: the test window of {esc(", ".join(sorted(few)))} holds fewer than {k} '
                 f"buyers or non-buyers; their curves are left out, since each point would speak of a few shoppers "
                 f"(<code>report --min-users</code>).</p>")
    test = {r: d[d["split"] == "test"] for r, d in preds.items() if (d["split"] == "test").any() and r not in few}
    if not test:
        return preds
    cv = {r: curves(d["label"].to_numpy(), d["probability"].to_numpy()) for r, d in test.items()}
    rel = {r: reliability_curve(d["label"].to_numpy(), d["probability"].to_numpy(), 10) for r, d in test.items()}
    base_rate = float(next(iter(test.values()))["label"].mean())
    charts = [
        page.chart("ROC curve", kind="line", diagonal=True, xmin=0, xmax=1, ymin=0, ymax=1, xfmt="pct", yfmt="pct",
                   series=[{"name": r, "points": c["roc"]} for r, c in cv.items()],
                   xlabel="false positive rate (non-buyers flagged)", ylabel="true positive rate (buyers found)"),
        page.chart("Precision-recall curve", kind="line", xmin=0, xmax=1, ymin=0, ymax=1, xfmt="pct", yfmt="pct",
                   hline=base_rate, series=[{"name": r, "points": c["pr"]} for r, c in cv.items()],
                   xlabel="recall (share of buyers found)", ylabel="precision (share of flagged who buy)"),
        page.chart("Calibration (reliability)", kind="line", diagonal=True, xmin=0, ymin=0, xfmt="pct", yfmt="pct",
                   series=[{"name": r, "dots": True, "points": [[a, b] for a, b in zip(c["mean_predicted"],
                                                                                     c["fraction_positive"])]}
                           for r, c in rel.items()],
                   xlabel="mean predicted probability (10 equal-size bins)", ylabel="observed share buying"),
        page.chart("Cumulative gain", kind="line", diagonal=True, xmin=0, xmax=1, ymin=0, ymax=1, xfmt="pct",
                   yfmt="pct", series=[{"name": r, "points": c["gain"]} for r, c in cv.items()],
                   xlabel="share of users targeted, highest scores first", ylabel="share of all buyers reached"),
        page.chart("Lift", kind="line", xmin=0, xmax=1, ymin=0, xfmt="pct", hline=1.0,
                   series=[{"name": r, "points": [pt for pt in c["lift"] if pt[0] >= 0.01]} for r, c in cv.items()],
                   xlabel="share of users targeted, highest scores first", ylabel="lift (× the overall buying rate)"),
    ]
    for r, d in test.items():
        h = histogram(d["probability"].to_numpy(), d["label"].to_numpy())
        charts.append(page.chart(f"Score distribution by class: {r}", kind="line", ymin=0, xmin=0, xfmt="pct",
                                 yfmt="pct", series=[{"name": k, "points": v} for k, v in h.items()],
                                 xlabel="predicted probability of buying", ylabel="share of the class"))
    page.add('<div class="grid">' + "".join(charts) + "</div>")
    return preds


def ensemble_members_text(metrics: dict) -> str:
    """"run (model, version), ..." of an ensemble's metrics.json; "" for any other model."""
    if metrics.get("model") != "ensemble":
        return ""
    out = []
    for m in metrics.get("members") or []:
        out.append(f"{m['run']} ({m['model']}, {m['version']})" if isinstance(m, dict) else str(m))
    return ", ".join(out)


def _reason_html(r: dict, scale: float) -> str:
    c = r["contribution"]
    width = max(2.0, 100 * abs(c) / scale) if scale > 0 else 2.0
    what = r.get("feature") or f"{r.get('event', 'event')} event"
    return (f'<div class="reason"><span>{c:+.3f}</span><span><span class="bar {"pos" if c > 0 else "neg"}" '
            f'style="display:inline-block;width:{width:.0f}px"></span></span>'
            f'<span>{esc(r["text"])} <code>{esc(what)}</code></span></div>')


def _explain_run(page: Page, ws: Workspace, run: str, built: runs.Built, preds: Optional[pd.DataFrame],
                 n_explain: Optional[int] = None, seed: int = 0) -> list[str]:
    """Global importance (+ event type / time / faithfulness for sequence models) and example reasons."""
    loaded = runs.load_run(run, ws)
    meta, model = loaded.meta, loaded.model
    if built.info["build_id"] != meta["build_id"]:
        page.add(f'<p class="note">{esc(run)}: trained on another build; retrain it to see its explanations.</p>')
        return []
    test_idx = np.flatnonzero(built.mask("test"))
    if len(test_idx) == 0:
        return []
    rng = np.random.default_rng(seed)
    cap = n_explain or N_EXPLAIN_SAMPLE.get(meta["model"], 500)
    sample = np.sort(rng.choice(test_idx, size=min(cap, len(test_idx)), replace=False))
    # the highest- and lowest-scored test examples are always explained
    if preds is not None and (preds["split"] == "test").any():
        t = preds[preds["split"] == "test"].sort_values("probability")
        pos = pd.Series(np.arange(len(built.examples)), index=built.examples["example_id"].to_numpy())
        picks = pos.reindex(np.r_[t["example_id"].to_numpy()[-3:][::-1], t["example_id"].to_numpy()[:2]]).dropna()
        picks = picks.astype(int).to_numpy()
    else:
        picks = sample[:3]
    idx = np.unique(np.r_[sample, picks])
    X = runs.model_inputs(meta["model"], built, idx, ws, runs.model_vocab(model))
    attr = explain.attribute(meta, model, X)
    imp = explain.global_importance(attr).head(15)
    charts = [page.chart(f"What drives the scores: {run}", kind="bar", labelWidth=200,
                         bars=[{"label": n, "value": v} for n, v in zip(imp["name"], imp["mean_abs"])],
                         xlabel=f"mean |contribution| (log-odds), {len(idx):,} test examples")]
    if attr.events is not None:
        by_type = explain.attribution_by_event_type(attr)
        charts.append(page.chart(f"Attribution by event type: {run}", kind="bar", labelWidth=130,
                                 bars=[{"label": k, "value": v["mean_per_example"]} for k, v in by_type.items()],
                                 xlabel="mean summed attribution per user (log-odds)"))
        by_time = [b for b in explain.attribution_by_time(attr) if b["n_events"]]
        charts.append(page.chart(f"Attribution by time before the cutoff: {run}", kind="bar", labelWidth=130,
                                 bars=[{"label": b["bin"], "value": b["mean_per_event"]} for b in by_time],
                                 xlabel="mean attribution per event (log-odds)"))
        f = explain.faithfulness(model, X, attr, seed=seed)
        charts.append(page.chart(
            f"Faithfulness: removing the most-attributed events: {run}", kind="line", xmin=0, ymin=0,
            series=[{"name": "highest attribution removed", "points": f["top_points"], "dots": True},
                    {"name": "random events removed", "points": f["random_points"], "dots": True, "dash": True}],
            xlabel="events removed from each history", ylabel="mean drop of the score (log-odds)"))
    page.add(f"<h3>{esc(run)}</h3>" + '<div class="grid">' + "".join(charts) + "</div>")
    # reasons of the picked users
    where = {int(i): k for k, i in enumerate(idx)}
    rows = [where[int(i)] for i in picks]
    sub = explain.Attribution(attr.feature_names, attr.features[rows], attr.base[rows],
                              None if attr.events is None else attr.events[rows],
                              None if attr.tokens is None else {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim == 2
                                                                    else v) for k, v in attr.tokens.items()})
    X_sub = {k: v[rows] for k, v in X.items()} if isinstance(X, dict) else X.iloc[rows]
    events = None
    if isinstance(X, dict):
        con = ws.connect()
        events = explain.sequence_events(con, built.examples.iloc[picks], X["mask"].shape[1])
    all_reasons = explain.reasons(sub, X_sub, top=5, events=events)
    p = np.asarray(model.predict_proba(X_sub))[:, 1]
    blocks = []
    for k, i in enumerate(picks):
        ex = built.examples.iloc[i]
        rs = all_reasons[k]
        scale = max([abs(r["contribution"]) for r in rs] + [1e-9])
        kind = "high score" if k < 3 else "low score"
        blocks.append(f'<div class="expl"><h4>{kind}: user <code>{esc(str(ex["user_id"])[:12])}</code> at '
                      f'{esc(str(ex["cutoff"])[:16])}, probability <span class="p">{p[k]:.1%}</span>, '
                      f'bought: {"yes" if ex["label"] else "no"}</h4>'
                      + "".join(_reason_html(r, scale) for r in rs) + "</div>")
    return blocks


def _privacy_section(page: Page, ws: Workspace, names: list[str], k: int) -> None:
    page.section("privacy", "Privacy settings")
    manifest = ws.read_manifest()
    key = (f"from the environment variable <code>{KEY_ENV}</code>" if os.environ.get(KEY_ENV)
           else f"key file <code>{esc(ws.key_path)}</code>" + ("" if ws.key_path.exists() else " (missing)"))
    dp = []
    for r in names:
        run_dir = ws.run_dir(r)
        meta = runs.read_meta(run_dir) if (run_dir / runs.RUN_JSON).exists() else {}
        params = meta.get("params", {})
        used = {k: v for k, v in params.items()
                if k.startswith("dp") or k in ("noise_multiplier", "epsilon", "max_grad_norm")}
        spent = meta.get("privacy") or {}
        if spent.get("epsilon") is not None:  # what the accountant gives at the end of training
            used = {"guarantee": spent.get("guarantee"), "accountant epsilon": round(spent["epsilon"], 3),
                    "delta": f"{spent['delta']:.2g}", "noise multiplier": round(spent["noise_multiplier"], 3),
                    "steps": spent.get("steps"), **used}
        if used:
            dp.append(f"{esc(r)}: " + ", ".join(f"{esc(k)}={esc(v)}" for k, v in used.items()))
        enc = (meta.get("encoder_privacy") or {}).get("encoder") or {}
        if enc.get("guarantee"):  # a DP-pretrained encoder; the run itself is not DP
            dp.append(f"{esc(r)}: not DP; its pretrained encoder is {esc(enc['guarantee'])} "
                      f"(noise {esc(round(float(enc.get('noise_multiplier', 0)), 3))}, {esc(enc.get('steps'))} steps)")
    rows = [["pseudonymisation", "on: user and session ids are HMAC-SHA256 pseudonyms" if manifest.get("key_id")
             else "no events ingested"],
            ["key id (a hash of the key, not the key)", esc(manifest.get("key_id") or "–")],
            ["key location", key],
            ["differentially private training", "; ".join(dp) if dp else "not used"],
            ["thresholds", f"counts of fewer than {k} users are withheld from this report's tables and charts"
                           if k > 1 else "off (--min-users 1): every count is shown"]]
    page.add(table(["setting", "value"], rows))


def _drift_section(page: Page, ws: Workspace, names: list[str]) -> None:
    """What `purchase-intent monitor` found for each run that has a monitor.json (no section when none does)."""
    found = [(r, p) for r in names if (p := ws.run_dir(r) / runs.MONITOR_JSON).exists()]
    if not found:
        return
    page.section("drift", "Drift")
    page.add('<p class="note">Latest window against the training window (<code>purchase-intent monitor</code>). '
             "Population stability index over deciles of the training values: below 0.1 stable, above 0.25 drift "
             "(unless the run was monitored with other thresholds, shown below). Live ROC-AUC only once the latest "
             "window's labels have matured, judged against the run's own evaluation interval.</p>")
    for r, path in found:
        try:
            _drift_run(page, r, json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError, IndexError, OSError):  # a damaged or older monitor.json: say so, go on
            page.add(f'<p class="note">{esc(r)}: its {runs.MONITOR_JSON} cannot be read; run monitor again.</p>')


def _drift_run(page: Page, r: str, m: dict) -> None:
    """One run's monitor.json: verdict cards, the windows, and the features with the largest PSI."""
    perf, rate = m["performance"], m["positive_rate"]
    live = (f"{num(perf['roc_auc'])} {interval(perf['roc_auc_ci'])}" if perf.get("roc_auc") is not None
            else "n/a")
    page.add(f"<h3>{esc(r)}: {esc(m['verdict'])}</h3>" + cards([
        ("verdict", m["verdict"]), ("score PSI", num(m["score"]["psi"])),
        ("positive rate, training", num(rate.get("training"))), ("positive rate, latest", num(rate.get("latest"))),
        ("live ROC-AUC", live), ("evaluation interval", interval(perf["expected"].get("roc_auc_ci")) or "n/a")]))
    lw, th = m["latest_window"], m["thresholds"]
    page.add(f'<p class="note">Latest window {esc(lw["cutoff"][:16])} to {esc(lw["end"][:16])} '
             f"({num(lw['n'])} users) against the training cutoff "
             f"{esc(m['training_window']['compared_cutoff'][:16])}; checked {esc(m['checked_at'][:16])}; "
             f"thresholds {num(th['stable_below'], 2)} / {num(th['drift_above'], 2)}."
             + "".join(f"<br>{esc(x)}" for x in m.get("reasons") or []) + "</p>")
    rows = [[esc(f["name"]) + (" (ignored)" if f.get("ignored") else ""), num(f["psi"]), esc(f["verdict"])]
            for f in m["features"][:15]]
    page.add(table(["feature (largest PSI first)", "PSI", "verdict"], rows))


# ---------------------------------------------------------------------------------------------
# the report
def _evaluated(ws: Workspace, run: str) -> bool:
    return (ws.run_dir(run) / runs.METRICS_JSON).exists()


def available_runs(ws: Workspace) -> list[str]:
    """Runs of the workspace that have been evaluated (have metrics.json), by name; not the versions
    `retrain` set aside (a former champion, a challenger not promoted), which ``--run`` can still name."""
    if not ws.runs_dir.is_dir():
        return []
    return sorted(d.name for d in ws.runs_dir.iterdir() if _evaluated(ws, d.name) and not _set_aside(d))


def _set_aside(run_dir: Path) -> bool:
    try:
        return runs.KEPT_VERSION in runs.read_meta(run_dir)
    except (FileNotFoundError, ValueError):
        return False


def _explain_section(page: Page, ws: Workspace, names: list[str], preds: dict[str, pd.DataFrame],
                     n_explain: Optional[int]) -> None:
    page.section("explain", "Why these scores? Global importance and example users")
    page.add('<p class="note">Contributions are in log-odds: positive raises the probability of buying. '
             "Logistic regression: coefficient × standardised value; LightGBM: TreeSHAP; Transformer: "
             "integrated gradients over the event embeddings and the tabular inputs, summed per event. "
             "Faithfulness: removing the events with the highest attribution should lower the score more "
             "than removing as many random events.</p>")
    built = runs.load_built(ws)
    examples = {}
    for r in names:
        if runs.read_metrics(ws.run_dir(r))["model"] not in ("logreg", "lightgbm", "transformer"):
            continue
        try:
            examples[r] = _explain_run(page, ws, r, built, preds.get(r), n_explain)
        except Exception as e:  # one run that cannot be explained must not cost the whole report
            page.add(f'<p class="note">{esc(r)}: no explanations ({esc(type(e).__name__)}: {esc(e)}).</p>')
    page.add("<h3>Example users: the highest and lowest test scores</h3>")
    if storage.active():  # the page is not encrypted: no pseudonym, item or category of a shopper on it
        page.add('<p class="note">Left out: this workspace is encrypted at rest, and these examples name users, '
                 "items and categories. <code>purchase-intent explain --run R --user ID</code> explains one user."
                 "</p>")
        return
    for r, blocks in examples.items():
        if blocks:
            page.add(f"<h4>{esc(r)}</h4>" + "".join(blocks))


def stale_runs(ws: Workspace, names: list[str]) -> list[str]:
    """One warning line per run of ``names`` marked stale by `forget` (retrain it to clear the mark)."""
    return [w for r in names if (w := runs.stale_warning(ws.run_dir(r)))]


def _render(ws: Workspace, names: list[str], with_explanations: bool, n_explain: Optional[int], k: int) -> str:
    missing = [r for r in names if not _evaluated(ws, r)]
    if missing:
        raise FileNotFoundError(f"runs without {runs.METRICS_JSON}: {', '.join(missing)} "
                                "(run `purchase-intent evaluate`)")
    page = Page("Purchase-intent report")
    # before everything: runs that learned from data erased since (`forget`), and runs whose scores point the
    # wrong way (`evaluate`'s warnings)
    warnings = stale_runs(ws, names) + [w for r in names for w in runs.read_metrics(ws.run_dir(r)).get("warnings", [])]
    if warnings:
        page.add('<p class="note"><b>Warning:</b> ' + "<br>".join(esc(w) for w in warnings) + "</p>")
    _data_section(page, ws, k)
    info = _task_section(page, ws, k)
    preds = _comparison_section(page, ws, names, k) if names else {}
    if names and with_explanations and info is not None:
        _explain_section(page, ws, names, preds, n_explain)
    _drift_section(page, ws, names)
    _privacy_section(page, ws, names, k)
    generated = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M UTC")
    return page.html(f"workspace {ws.root.resolve()} · runs: {', '.join(names) or 'none'} · generated {generated}")


def write_report(workspace: Workspace | str | Path | None = None, runs: Optional[list[str]] = None,
                 out: str | Path | None = None, explain: bool = True, n_explain: Optional[int] = None,
                 min_users: int = MIN_USERS) -> Path:
    """Write the report of ``runs`` (default: every evaluated run) to ``out`` (default
    ``<workspace>/report.html``) and return its path; ``explain=False`` skips loading the models.

    ``n_explain``: test examples explained per run (default ``N_EXPLAIN_SAMPLE``). Raises
    FileNotFoundError for a run without metrics.json. ``min_users``: thresholds, a count of fewer users
    than this is withheld from the tables and charts (1 shows every count).
    """
    # the parameters shadow the modules `runs` and `explain`: _render sees the modules
    ws = as_workspace(workspace)
    k = check_min_users(min_users)
    text = _render(ws, list(runs) if runs else available_runs(ws), explain, n_explain, k)
    path = Path(out) if out else ws.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
