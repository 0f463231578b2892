"""The rolling-origin prior as the CLI makes it: `pretrain --rolling`, then models with `prior=true`.

    .venv/bin/python benchmarks/bench_prior.py --users 6000 --days 63 --fractions 1,0.1 --subsets 3 --seeds 2 \\
        --out benchmarks/results/bench_prior.md

The simulated shop of ``sim_shop.py`` is ingested and built; ``purchase-intent pretrain --objective
future --rolling`` (the command users run, as a subprocess) pretrains one encoder per cutoff of the
build, each on the events before it, and one on every event. Then each model is fitted by the
registry path that ``purchase-intent train`` runs (``pipeline.fit_model``: the encoder found in
``runs/pretrained``, its vocabulary, the inputs with each example's cutoff), on the train examples of
``fraction`` of the users (as ``bench_label_seeds.py`` draws them; valid and test whole), over
``--subsets`` label draws x ``--seeds`` seeds, and scored on the test split:

* ``lightgbm``, ``transformer``: from scratch, no pretraining;
* ``lightgbm_emb+prior``: LightGBM on the features and the prior (``embedding=false, prior=true``);
* ``transformer+prior``: the from-scratch Transformer with the prior as one more tabular input
  (``prior=true``; its tokens use the encoders' vocabulary);
* ``transformer_pt``: fine-tuned from the main encoder (the one before the first test cutoff);
* ``transformer_pt+prior``: the same with the prior as one more tabular input.

Differences are the mean over the runs with a 95% t interval over them (each run paired on the same
test examples), as in ``bench_label_seeds.py``. The label fractions are not a CLI option, hence the
registry path for the fits; everything else is what the commands run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sim_shop import labelled_rows, simulated_shop, t_interval, write_results
from sklearn.metrics import roc_auc_score

from purchase_intent import pipeline
from purchase_intent.config import TrainConfig
from purchase_intent.models.prior import RollingPrior
from purchase_intent.runs import model_inputs, model_vocab
from purchase_intent.sequences import SequenceVocab

MODELS = {"lightgbm": ("lightgbm", {}),
          "lightgbm_emb+prior": ("lightgbm_emb", {"embedding": False, "prior": True}),
          "transformer": ("transformer", {}),
          "transformer+prior": ("transformer", {"prior": True}),
          "transformer_pt": ("transformer_pt", {}),
          "transformer_pt+prior": ("transformer_pt", {"prior": True})}
PAIRS = [("lightgbm_emb+prior", "lightgbm"), ("transformer+prior", "transformer"), ("transformer+prior", "lightgbm"),
         ("transformer_pt+prior", "transformer"),
         ("transformer_pt+prior", "lightgbm"), ("transformer_pt+prior", "transformer_pt"),
         ("transformer_pt", "transformer"), ("transformer", "lightgbm")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--fractions", default="1,0.1", help="shares of the users whose train labels are used")
    ap.add_argument("--subsets", type=int, default=3, help="random draws of the labelled users (fractions < 1)")
    ap.add_argument("--seeds", type=int, default=2, help="model seeds per draw")
    ap.add_argument("--window", type=int, default=200, help="pretrain --max-seq-len")
    ap.add_argument("--epochs", type=int, default=60, help="pretrain --epochs (each rolling encoder)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--workdir", default="/tmp/bench_prior")
    ap.add_argument("--out", default="benchmarks/results/bench_prior.md")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        raise SystemExit(f"error: --models {args.models!r}: choose from {', '.join(MODELS)}")
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    ws, built, (tr, va, te) = simulated_shop(Path(args.workdir), args.users, args.days)
    y = built.examples["label"].to_numpy()
    yt = y[te]
    print(f"examples: train {len(tr)} valid {len(va)} test {len(te)}; test positives {int(yt.sum())}", flush=True)

    cli = str(Path(sys.executable).with_name("purchase-intent"))
    cmd = [cli, "--workspace", str(ws.root), "pretrain", "--objective", "future", "--rolling", "--preset", "tiny",
           "--max-seq-len", str(args.window), "--epochs", str(args.epochs)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    t_pretrain = time.perf_counter() - t0
    prior = RollingPrior.load(ws.run_dir("pretrained"))
    vocab = SequenceVocab.from_dict(json.loads((ws.run_dir("pretrained") / "config.json").read_text())["vocab"])
    X_test = model_inputs("lightgbm_emb", built, te, ws, vocab)
    head_auc = roc_auc_score(yt, np.nan_to_num(prior.logodds(X_test), nan=-1e9))
    print(f"pretrain: {len(prior.nets)} encoders in {t_pretrain:.0f}s; the prior alone on test: {head_auc:.4f}",
          flush=True)

    def fit_predict(name: str, rows: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
        model, params = MODELS[name]
        t = time.perf_counter()
        m = pipeline.fit_model(model, dict(params), built, rows, va, ws,
                               TrainConfig(min_positives=5, min_negatives=5, seed=seed))
        p = m.predict_proba(model_inputs(model, built, te, ws, model_vocab(m)))[:, 1]
        return p, time.perf_counter() - t

    preds: dict = {}
    secs: dict = {}
    n_rows: dict = {}
    for frac in (float(f) for f in args.fractions.split(",")):
        for subset in range(args.subsets if frac < 1 else 1):
            rows = labelled_rows(built.examples, tr, frac, seed=subset)
            n_rows.setdefault(frac, []).append((len(rows), int(y[rows].sum())))
            for seed in range(args.seeds):
                for name in models:
                    p, s = fit_predict(name, rows, seed)
                    preds.setdefault((frac, name), []).append(p)
                    secs.setdefault((frac, name), []).append(s)
                print(f"{frac:.0%} subset {subset} seed {seed}: " + ", ".join(
                    f"{n} {roc_auc_score(yt, p[-1]):.4f}" for (f, n), p in preds.items() if f == frac), flush=True)
    load1 = open("/proc/loadavg").read().split()[:3]

    def auc(frac: float, name: str) -> np.ndarray:
        return np.array([roc_auc_score(yt, p) for p in preds[(frac, name)]])

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = (f".venv/bin/python benchmarks/bench_prior.py --users {args.users} --days {args.days} --fractions "
               f"{args.fractions} --subsets {args.subsets} --seeds {args.seeds} --window {args.window} --epochs "
               f"{args.epochs} --models {','.join(models)}")
    lines = [f"## The rolling-origin prior through `pretrain --rolling` and `prior=true` ({today})", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared VM), load average "
             f"at start {' '.join(load0)}, at end {' '.join(load1)}; total {time.perf_counter() - t_start:.0f}s.", "",
             f"Simulator {args.users:,} users x {args.days} days (seed 0), default LabelConfig; train {len(tr):,}, "
             f"valid {len(va):,}, test {len(te):,} examples ({int(yt.sum())} test positives).", "",
             f"`{' '.join(['purchase-intent', *cmd[1:]])}`: {len(prior.nets)} encoders (cutoffs "
             f"{', '.join(c[:10] for c in prior.cutoffs())}) in {t_pretrain:.0f}s. The prior alone (no label) on the "
             f"test split: ROC-AUC {head_auc:.4f}.", "",
             "| labelled users | train examples (positives) per draw | model | mean test ROC-AUC (min-max) | "
             "mean fit + score seconds |", "|---|---|---|---|---|"]
    for (frac, name), ps in preds.items():
        a = auc(frac, name)
        lines.append(f"| {frac:.0%} | " + ", ".join(f"{r:,} ({p})" for r, p in n_rows[frac])
                     + f" | {name} | {a.mean():.4f} ({a.min():.4f}-{a.max():.4f}) | "
                     f"{np.mean(secs[(frac, name)]):.0f} |")
    lines += ["", "Differences (mean over the runs [95% t interval over the runs] | share of runs above zero | runs):",
              "", "| labelled users | model | reference | ΔROC-AUC | runs > 0 | runs |", "|---|---|---|---|---|---|"]
    for frac in sorted({f for f, _ in preds}, reverse=True):
        for a, b in PAIRS:
            if a in models and b in models:
                d = auc(frac, a) - auc(frac, b)
                mean, lo, hi = t_interval(d)
                lines.append(f"| {frac:.0%} | {a} | {b} | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                             f"{(d > 0).mean():.0%} | {len(d)} |")
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
