"""The `future` encoder's purchase probability as a feature, cross-fitted by user: does it lift LightGBM?

    .venv/bin/python benchmarks/crossfit_prior.py --users 6000 --days 63 --fractions 1,0.1 --subsets 3 --seeds 3 \\
        --out benchmarks/results/crossfit_prior.md

The ``future`` pretraining objective learns, from events alone, whether a purchase follows a point in a
history within 1, 7 and 28 days (BENCHMARKS.md: its 7-day head ranks the test examples at about
LightGBM's level with 10% of the labels, and with no label at all). Handing that probability to a
supervised model as one more feature fails if the encoder was pretrained on the same users' later
events: for a train or valid example, the purchases after its cutoff are the head's own targets, so
the feature is far better on the train split than on the test split (an in-sample leak), and the
model over-trusts it.

Two ways to keep the feature out of sample (``--by``):

* ``users`` (cross-fitting): the users are split into ``--folds`` groups; for each group an encoder
  is pretrained on the other groups' events before the first test cutoff, and it scores the examples
  (train, valid and test) of that group only. No example's feature comes from an encoder that read
  any event of its user, and no encoder reads an event at or after the first test cutoff. But the
  encoders read *other* users' events after a train example's cutoff: the feature of an example
  depends on events at and after its cutoff, which the project's leakage rule forbids for features.
* ``cutoffs`` (rolling origin): for each cutoff of the built examples an encoder is pretrained on
  every user's events before that cutoff, and it scores the examples at that cutoff. Each feature is
  a function of events before its example's cutoff only, as every feature must be, and as the
  feature would be computed in production (an encoder pretrained before the scoring time).

Models (``--models``: LightGBM, the from-scratch Transformer, or both), each fitted on the train
examples of ``fraction`` of the users (as ``bench_label_seeds.py`` draws them; valid and test whole),
over ``--subsets`` label draws x ``--seeds`` seeds:

* ``MODEL``: the built features;
* ``MODEL+prior``: the same plus the out-of-sample log-odds of the 7-day head (``--by``; the
  Transformer reads it with the other features, in its tabular input); with ``--rank``, its rank
  within its cutoff instead (0-1), which removes each encoder's own scale;
* ``MODEL+prior_in_sample`` (with ``--in-sample``): plus the log-odds of one encoder pretrained on
  every user, to show the leak that cross-fitting removes.

The out-of-sample head alone (no label used) is scored on the test split too.

Differences are the mean over the runs with a 95% t interval over them (each run paired on the same
test examples), as in ``bench_label_seeds.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from future_head import future_logits
from scipy import stats
from sim_shop import labelled_rows, simulated_shop, t_interval, write_results
from sklearn.metrics import roc_auc_score

from purchase_intent import pipeline
from purchase_intent.config import TrainConfig
from purchase_intent.models.baselines import LightGBMModel
from purchase_intent.pretrain import evaluation_cutoff
from purchase_intent.runs import model_inputs, model_vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--fractions", default="1,0.1", help="shares of the users whose train labels are used")
    ap.add_argument("--subsets", type=int, default=3, help="random draws of the labelled users (fractions < 1)")
    ap.add_argument("--seeds", type=int, default=3, help="model seeds per draw")
    ap.add_argument("--by", choices=["users", "cutoffs"], default="users",
                    help="users: cross-fitted by user groups; cutoffs: one encoder per cutoff, on events before it")
    ap.add_argument("--rank", action="store_true",
                    help="hand the models the feature's rank within its cutoff (0-1) instead of the log-odds")
    ap.add_argument("--folds", type=int, default=2, help="user groups of the cross-fitting (--by users)")
    ap.add_argument("--window", type=int, default=200, help="events per user of the encoders")
    ap.add_argument("--epochs", type=int, default=30, help="pretraining epochs of each encoder")
    ap.add_argument("--in-sample", action="store_true", help="also the encoder pretrained on every user")
    ap.add_argument("--models", default="lightgbm", help="lightgbm, transformer or both (comma-separated)")
    ap.add_argument("--workdir", default="/tmp/crossfit_prior")
    ap.add_argument("--out", default="benchmarks/results/crossfit_prior.md")
    args = ap.parse_args()
    if args.folds < 2:
        raise SystemExit("error: --folds must be at least 2")
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - {"lightgbm", "transformer"}:
        raise SystemExit(f"error: --models {args.models!r}: choose lightgbm, transformer or both")
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    ws, built, (tr, va, te) = simulated_shop(Path(args.workdir), args.users, args.days)
    ex = built.examples
    y = ex["label"].to_numpy()
    yt = y[te]
    cut = evaluation_cutoff(ws)
    print(f"examples: train {len(tr)} valid {len(va)} test {len(te)}; test positives {int(yt.sum())}; "
          f"pretraining cutoff {cut}", flush=True)

    con = ws.connect()
    users = np.array(sorted(r[0] for r in con.execute("SELECT DISTINCT user_id FROM events").fetchall()))
    group = dict(zip(users, np.random.default_rng(12345).permutation(len(users)) % args.folds))
    ex_group = ex["user_id"].map(group).to_numpy()
    prior = np.full(len(ex), np.nan)
    t0 = time.perf_counter()
    if args.by == "users":
        for k in range(args.folds):
            rows = np.flatnonzero(ex_group == k)
            prior[rows] = future_logits(ws, cut, users[[group[u] != k for u in users]], ex.iloc[rows], args.window,
                                        args.epochs, seed=k)
            print(f"fold {k}: {len(rows)} examples scored ({time.perf_counter() - t0:.0f}s)", flush=True)
    else:
        ex_cut = ex["cutoff"].to_numpy()
        for k, c in enumerate(np.unique(ex_cut)):
            rows = np.flatnonzero(ex_cut == c)
            prior[rows] = future_logits(ws, pd.Timestamp(c).to_pydatetime(), users, ex.iloc[rows], args.window,
                                        args.epochs, seed=k)
            print(f"cutoff {c}: {len(rows)} examples scored ({time.perf_counter() - t0:.0f}s)", flush=True)
    secs = {f"out of sample (by {args.by})": time.perf_counter() - t0}
    if args.rank:  # each encoder's own scale removed: the share of the cutoff's examples ranked below
        ex_cut = ex["cutoff"].to_numpy()
        for c in np.unique(ex_cut):
            rows = np.flatnonzero((ex_cut == c) & ~np.isnan(prior))
            prior[rows] = stats.rankdata(prior[rows]) / len(rows)
    columns = {"prior": prior}
    if args.in_sample:
        t0 = time.perf_counter()
        columns["prior_in_sample"] = future_logits(ws, cut, users, ex, args.window, args.epochs, seed=0)
        secs["in-sample"] = time.perf_counter() - t0
    splits_auc = {}
    for name, col in columns.items():
        for split, idx in (("train", tr), ("valid", va), ("test", te)):
            ok = ~np.isnan(col[idx])
            splits_auc[(name, split)] = roc_auc_score(y[idx][ok], col[idx][ok])
    print({k: round(v, 4) for k, v in splits_auc.items()}, flush=True)

    X = built.features
    X = X.to_frame() if hasattr(X, "to_frame") else X
    variants = {"": X, **{"+" + name: X.assign(future_7d_logit=col) for name, col in columns.items()}}

    def fit_predict(model: str, F: pd.DataFrame, rows: np.ndarray, seed: int) -> np.ndarray:
        if model == "lightgbm":
            return LightGBMModel(random_state=seed).fit(F.iloc[rows], y[rows], F.iloc[va], y[va]).predict_proba(
                F.iloc[te])[:, 1]
        b = dataclasses.replace(built, features=F)  # the Transformer reads the features as its tabular input
        m = pipeline.fit_model(model, {}, b, rows, va, ws, TrainConfig(min_positives=5, min_negatives=5, seed=seed))
        return m.predict_proba(model_inputs(model, b, te, ws, model_vocab(m)))[:, 1]

    preds: dict = {}
    n_rows: dict = {}
    for frac in (float(f) for f in args.fractions.split(",")):
        for subset in range(args.subsets if frac < 1 else 1):
            rows = labelled_rows(ex, tr, frac, seed=subset)
            n_rows.setdefault(frac, []).append((len(rows), int(y[rows].sum())))
            for seed in range(args.seeds):
                for model in models:
                    for suffix, F in variants.items():
                        preds.setdefault((frac, model + suffix), []).append(fit_predict(model, F, rows, seed))
                print(f"{frac:.0%} subset {subset} seed {seed}: " + ", ".join(
                    f"{n} {roc_auc_score(yt, p[-1]):.4f}" for (f, n), p in preds.items() if f == frac), flush=True)
    load1 = open("/proc/loadavg").read().split()[:3]

    def diff(frac: float, a: str, b: str) -> str:
        d = (np.array([roc_auc_score(yt, p) for p in preds[(frac, a)]])
             - np.array([roc_auc_score(yt, p) for p in preds[(frac, b)]]))
        mean, lo, hi = t_interval(d)
        return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | {(d > 0).mean():.0%} | {len(d)}"

    test_prior = np.nan_to_num(prior[te], nan=np.nanmin(prior))
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cmd = (f".venv/bin/python benchmarks/crossfit_prior.py --users {args.users} --days {args.days} --fractions "
           f"{args.fractions} --subsets {args.subsets} --seeds {args.seeds} --by {args.by} --folds {args.folds} "
           f"--window {args.window} --epochs {args.epochs} --models {args.models}"
           + (" --in-sample" if args.in_sample else "") + (" --rank" if args.rank else ""))
    lines = [f"## The `future` head's 7-day log-odds as a feature, out of sample by {args.by} ({today})", "",
             f"Command: `{cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared VM), load average "
             f"at start {' '.join(load0)}, at end {' '.join(load1)}; total {time.perf_counter() - t_start:.0f}s; "
             "pretraining " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()) + ".", "",
             f"Simulator {args.users:,} users x {args.days} days (seed 0), default LabelConfig; train {len(tr):,}, "
             f"valid {len(va):,}, test {len(te):,} examples ({int(yt.sum())} test positives); encoders: tiny, window "
             f"{args.window}, {args.epochs} epochs, events before "
             + (f"{cut} (the first test cutoff)" if args.by == "users" else "each example's cutoff") + ".", "",
             "The feature alone, ROC-AUC per split (examples with no event before their cutoff left out). An "
             "in-sample feature that ranks train or valid far better than test is the leak:", "",
             "| feature | train | valid | test |", "|---|---|---|---|"]
    for name in columns:
        lines.append(f"| {name} | " + " | ".join(f"{splits_auc[(name, s)]:.4f}" for s in ("train", "valid", "test"))
                     + " |")
    lines += ["", f"The out-of-sample head alone on the test split, no label: ROC-AUC "
              f"{roc_auc_score(yt, test_prior):.4f}.", "",
              "| labelled users | train examples (positives) per draw | model | mean test ROC-AUC (min-max) |",
              "|---|---|---|---|"]
    for (frac, name), ps in preds.items():
        a = np.array([roc_auc_score(yt, p) for p in ps])
        lines.append(f"| {frac:.0%} | " + ", ".join(f"{r:,} ({p})" for r, p in n_rows[frac])
                     + f" | {name} | {a.mean():.4f} ({a.min():.4f}-{a.max():.4f}) |")
    lines += ["", "Differences (mean over the runs [95% t interval over the runs] | share of runs above zero | runs):",
              "", "| labelled users | model | reference | ΔROC-AUC | runs > 0 | runs |", "|---|---|---|---|---|---|"]
    refs = [(m + s, m) for m in models for s in variants if s] + (
        [(f"transformer{s}", "lightgbm") for s in variants] if len(models) == 2 else [])
    for frac in sorted({f for f, _ in preds}, reverse=True):
        for a, b in refs:
            lines.append(f"| {frac:.0%} | {a} | {b} | {diff(frac, a, b)} |")
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
