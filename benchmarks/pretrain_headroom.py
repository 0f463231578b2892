"""How much a pretrained encoder could add on the simulator: the label curve and a zero-label ranking.

    .venv/bin/python benchmarks/pretrain_headroom.py --users 6000 --days 63 \
        --out benchmarks/results/pretrain_headroom.md

Two measurements on one simulated shop (default LabelConfig: lookback 28d, horizon 7d, step 7d; the
test split is the last period), every figure on the same test examples:

1. **Label curve.** LightGBM and the from-scratch Transformer fitted on the train examples of a
   fraction of the users (``--fractions``; valid as given), as ``bench_pretrain.py`` draws them. A
   pretrained encoder can lift a supervised model at most to what more labels would give it, so the
   gap between a fraction and 100% bounds what pretraining can add at that fraction.
2. **Zero labels.** The ``future`` objective trains the encoder to predict, at a random time inside
   each history, whether a purchase follows within 1, 7 and 28 days: the task's own target, read
   from the events of every user before the first test cutoff (the pretraining cutoff, as
   ``purchase-intent pretrain`` sets it), with no label of any example. Its 7-day head, applied to
   the test examples' sequences, ranks them with no label at all; ``--windows`` and ``--epochs``
   vary the events per user and the passes over them.

The pretraining (``future_head.future_logits``) runs the library's own pieces (``fit_vocab``,
``build_sequences(times=True)``, ``make_objective("future")``, ``pretrain_encoder``) so that the objective's head, which
``purchase-intent pretrain`` does not keep, can score the test examples.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from future_head import future_logits
from sim_shop import labelled_rows, simulated_shop, write_results
from sklearn.metrics import average_precision_score, roc_auc_score

from purchase_intent import pipeline
from purchase_intent.config import TrainConfig
from purchase_intent.evaluate import paired_auc_difference
from purchase_intent.pretrain import evaluation_cutoff
from purchase_intent.runs import model_inputs, model_vocab
from purchase_intent.workspace import Workspace


def fit_and_score(name, built, rows, va, te, ws, seed):
    t0 = time.perf_counter()
    model = pipeline.fit_model(name, {}, built, rows, va, ws, TrainConfig(min_positives=5, min_negatives=5, seed=seed))
    secs = time.perf_counter() - t0
    return model.predict_proba(model_inputs(name, built, te, ws, model_vocab(model)))[:, 1], secs


def zero_label_scores(ws: Workspace, test: pd.DataFrame, window: int, epochs: int,
                      seed: int) -> tuple[np.ndarray, float]:
    """The `future` head's 7-day probability for each test example (rows of ``test``), pretrained on every user's
    events before the first test cutoff, and the seconds taken."""
    t0 = time.perf_counter()
    cut = evaluation_cutoff(ws)
    users = np.array([r[0] for r in ws.connect().execute("SELECT DISTINCT user_id FROM events").fetchall()])
    logits = future_logits(ws, cut, users, test, window, epochs, seed)
    # a user without events before the cutoff gets 0
    score = np.where(np.isnan(logits), 0.0, 1.0 / (1.0 + np.exp(-np.nan_to_num(logits))))
    return score, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--fractions", default="1,0.1,0.05,0.02", help="shares of the users whose train labels are used")
    ap.add_argument("--windows", default="50,200", help="events per user of the zero-label encoder")
    ap.add_argument("--epochs", default="12,60", help="pretraining epochs of the zero-label encoder")
    ap.add_argument("--seed", type=int, default=0, help="the models' and the encoder's seed")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--workdir", default="/tmp/pretrain_headroom")
    ap.add_argument("--out", default="benchmarks/results/pretrain_headroom.md")
    args = ap.parse_args()
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    work = Path(args.workdir)
    ws, built, (tr, va, te) = simulated_shop(work, args.users, args.days)
    ex = built.examples
    y = ex["label"].to_numpy()
    yt = y[te]
    print(f"examples: train {len(tr)} valid {len(va)} test {len(te)}; test positives {int(yt.sum())}")

    preds: dict = {}
    rows_used: dict = {}
    for frac in (float(f) for f in args.fractions.split(",")):
        sub = labelled_rows(ex, tr, frac)
        rows_used[frac] = (len(sub), int(y[sub].sum()))
        for name in ("lightgbm", "transformer"):
            preds[(frac, name)], s = fit_and_score(name, built, sub, va, te, ws, args.seed)
            print(f"{frac:.0%} {name}: {roc_auc_score(yt, preds[(frac, name)]):.4f} ({s:.0f}s)")
    zero: dict = {}
    test = ex.iloc[te].reset_index(drop=True)
    for window in (int(w) for w in args.windows.split(",")):
        for epochs in (int(e) for e in args.epochs.split(",")):
            zero[(window, epochs)] = zero_label_scores(ws, test, window, epochs, args.seed)
            print(f"zero labels, window {window}, {epochs} epochs: {roc_auc_score(yt, zero[(window, epochs)][0]):.4f} "
                  f"({zero[(window, epochs)][1]:.0f}s)")
    load1 = open("/proc/loadavg").read().split()[:3]

    def ci(a, b):
        d = paired_auc_difference(yt, a, b, n_boot=args.n_boot)
        return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"

    full_tf = preds[(1.0, "transformer")] if (1.0, "transformer") in preds else None
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"## Pretraining headroom on the simulator ({today})", "",
             f"Command: `.venv/bin/python benchmarks/pretrain_headroom.py --users {args.users} --days {args.days} "
             f"--fractions {args.fractions} --windows {args.windows} --epochs {args.epochs} --seed {args.seed} "
             f"--n-boot {args.n_boot}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared VM), load average "
             f"at start {' '.join(load0)}, at end {' '.join(load1)}; total {time.perf_counter() - t_start:.0f}s.", "",
             f"Simulator {args.users:,} users x {args.days} days (seed 0), default LabelConfig; train {len(tr):,}, "
             f"valid {len(va):,}, test {len(te):,} examples ({int(yt.sum())} test positives). Test-split ROC-AUC; "
             f"differences are paired bootstrap 95% intervals ({args.n_boot} resamples).", "",
             "### Label curve", "",
             "| labelled users | train examples (positives) | model | ROC-AUC | PR-AUC | vs the same model at 100% |",
             "|---|---|---|---|---|---|"]
    for (frac, name), p in preds.items():
        ref = preds.get((1.0, name))
        lines.append(f"| {frac:.0%} | {rows_used[frac][0]:,} ({rows_used[frac][1]:,}) | {name} | "
                     f"{roc_auc_score(yt, p):.4f} | {average_precision_score(yt, p):.4f} | "
                     f"{ci(p, ref) if ref is not None and frac < 1 else '-'} |")
    lines += ["", "### Zero labels: the `future` head's 7-day probability", "",
              "| window (events per user) | epochs | pretraining s | ROC-AUC | PR-AUC | vs the Transformer at 100% |",
              "|---|---|---|---|---|---|"]
    for (window, epochs), (s, secs) in zero.items():
        lines.append(f"| {window} | {epochs} | {secs:.0f} | {roc_auc_score(yt, s):.4f} | "
                     f"{average_precision_score(yt, s):.4f} | {ci(s, full_tf) if full_tf is not None else '-'} |")
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
