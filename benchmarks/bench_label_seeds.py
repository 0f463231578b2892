"""Few labels, judged over several label subsets and seeds: pretrained against from-scratch models.

    .venv/bin/python benchmarks/bench_label_seeds.py --users 6000 --days 63 --fraction 0.1 --subsets 3 --seeds 3 \\
        --encoder masked:objective=masked,epochs=12 --encoder future200:objective=future,max_seq_len=200,epochs=60 \\
        --out benchmarks/results/label_seeds.md

One simulated shop (default LabelConfig: lookback 28d, horizon 7d, step 7d; the test split is the last
period). Each ``--encoder NAME:FIELD=VALUE,...`` (``PretrainConfig`` fields) is pretrained once, on
every user's events before the first test cutoff, as ``purchase-intent pretrain`` does. Then, for each
of ``--subsets`` random draws of ``--fraction`` of the users (the train examples of those users are
the labels; valid and test stay whole) and each of ``--seeds`` model seeds, every model is fitted
and scored on the test split:

* ``lightgbm`` and ``transformer`` (defaults: window 50), ``transformer_w200`` (window 200)
  (``--models`` picks among these three);
* ``transformer_pt[NAME]`` for each encoder, fine-tuned at the encoder's window, and with
  ``--with-emb`` ``lightgbm_emb[NAME]`` (LightGBM on the features and the encoder's embedding).

``--fraction 1 --subsets 1`` compares the models with every label, over seeds only.

A single run's paired bootstrap interval covers the test examples' noise but not the spread between
label draws and seeds, which is as large as the effects measured (BENCHMARKS.md). So each difference is
reported as the mean over the subsets x seeds runs with a t interval over those runs (each run's
difference paired on the same test examples), the share of runs in which it is above zero, and the
paired bootstrap interval of the models' mean predictions over the runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sim_shop import labelled_rows, simulated_shop, t_interval, write_results
from sklearn.metrics import roc_auc_score

from purchase_intent import pipeline
from purchase_intent.config import TrainConfig
from purchase_intent.evaluate import paired_auc_difference
from purchase_intent.pretrain import PretrainConfig, pretrain
from purchase_intent.runs import model_inputs, model_vocab


def parse_spec(spec: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE,...`` -> (NAME, {KEY: VALUE}); numbers and true/false as JSON."""
    name, _, rest = spec.partition(":")
    out = {}
    for pair in filter(None, rest.split(",")):
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return name, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the users whose train labels are used")
    ap.add_argument("--subsets", type=int, default=3, help="random draws of the labelled users")
    ap.add_argument("--seeds", type=int, default=3, help="model seeds per draw")
    ap.add_argument("--encoder", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                    help="an encoder to pretrain (PretrainConfig fields), repeatable")
    ap.add_argument("--models", default="lightgbm,transformer,transformer_w200",
                    help="from-scratch models: lightgbm, transformer, transformer_w200")
    ap.add_argument("--with-emb", action="store_true", help="also lightgbm_emb for each encoder")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--workdir", default="/tmp/bench_label_seeds")
    ap.add_argument("--out", default="benchmarks/results/label_seeds.md")
    args = ap.parse_args()
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    work = Path(args.workdir)
    ws, built, (tr, va, te) = simulated_shop(work, args.users, args.days)
    ex = built.examples
    y = ex["label"].to_numpy()
    yt = y[te]
    print(f"examples: train {len(tr)} valid {len(va)} test {len(te)}; test positives {int(yt.sum())}", flush=True)

    scratch = {"lightgbm": ("lightgbm", {}), "transformer": ("transformer", {}),
               "transformer_w200": ("transformer", {"max_seq_len": 200})}
    unknown = set(args.models.split(",")) - set(scratch)
    if unknown:
        raise SystemExit(f"error: unknown --models {sorted(unknown)}: choose from {', '.join(scratch)}")
    models = [(m, *scratch[m]) for m in args.models.split(",")]
    pre_secs = {}
    for spec in args.encoder:
        name, fields = parse_spec(spec)
        t0 = time.perf_counter()
        out = pretrain(ws, PretrainConfig(**fields))
        pre_secs[name] = time.perf_counter() - t0
        keep = work / f"encoder_{name}"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(out, keep)
        window = int(fields.get("max_seq_len", PretrainConfig.max_seq_len))
        models.append((f"transformer_pt[{name}]", "transformer_pt", {"encoder": str(keep), "max_seq_len": window}))
        if args.with_emb:
            models.append((f"lightgbm_emb[{name}]", "lightgbm_emb", {"encoder": str(keep)}))
        print(f"pretrained {name} in {pre_secs[name]:.0f}s", flush=True)

    preds = {m[0]: [] for m in models}
    n_rows = []
    for subset in range(args.subsets):
        rows = labelled_rows(ex, tr, args.fraction, seed=subset)
        n_rows.append((len(rows), int(y[rows].sum())))
        for seed in range(args.seeds):
            for label, name, params in models:
                model = pipeline.fit_model(name, params, built, rows, va, ws,
                                           TrainConfig(min_positives=5, min_negatives=5, seed=seed))
                p = model.predict_proba(model_inputs(name, built, te, ws, model_vocab(model)))[:, 1]
                preds[label].append(p)
                print(f"subset {subset} seed {seed} {label}: {roc_auc_score(yt, p):.4f}", flush=True)
    load1 = open("/proc/loadavg").read().split()[:3]

    auc = {k: np.array([roc_auc_score(yt, p) for p in v]) for k, v in preds.items()}

    def diff(a: str, b: str) -> str:
        d = auc[a] - auc[b]
        mean, lo, hi = t_interval(d)
        boot = paired_auc_difference(yt, np.mean(preds[a], axis=0), np.mean(preds[b], axis=0), n_boot=args.n_boot)
        return (f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | {(d > 0).mean():.0%} | "
                f"{boot['diff']:+.4f} [{boot['ci'][0]:+.4f}, {boot['ci'][1]:+.4f}]")

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    cmd = (f".venv/bin/python benchmarks/bench_label_seeds.py --users {args.users} --days {args.days} "
           f"--fraction {args.fraction} --subsets {args.subsets} --seeds {args.seeds} --models {args.models}"
           + (" --with-emb" if args.with_emb else "")
           + "".join(f" --encoder {e}" for e in args.encoder) + f" --n-boot {args.n_boot}")
    lines = [f"## {args.fraction:.0%} of the labels over {args.subsets} label draws x {args.seeds} seeds ({today})", "",
             f"Command: `{cmd}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared VM), load average "
             f"at start {' '.join(load0)}, at end {' '.join(load1)}; total {time.perf_counter() - t_start:.0f}s.", "",
             f"Simulator {args.users:,} users x {args.days} days (seed 0), default LabelConfig; test {len(te):,} "
             f"examples ({int(yt.sum())} positives), valid {len(va):,}; labelled train examples per draw "
             + ", ".join(f"{r:,} ({p} positives)" for r, p in n_rows) + ". Pretraining: "
             + ", ".join(f"{k} {v:.0f}s" for k, v in pre_secs.items()) + ".", "",
             "| model | mean ROC-AUC (min-max over runs) |", "|---|---|"]
    lines += [f"| {k} | {v.mean():.4f} ({v.min():.4f}-{v.max():.4f}) |" for k, v in auc.items()]
    lines += ["", "Differences (model - reference): mean over the runs [95% t interval over the runs] | share of runs "
              "above zero | the runs' mean predictions compared, paired bootstrap [95% interval]:", "",
              "| model | reference | mean ΔROC-AUC [t interval] | runs > 0 | mean predictions: ΔROC-AUC [bootstrap] |",
              "|---|---|---|---|---|"]
    pairs = [("transformer", "lightgbm"), ("transformer_w200", "transformer")]
    for m in (m[0] for m in models if m[1] in ("transformer_pt", "lightgbm_emb")):
        pairs += [(m, "transformer"), (m, "transformer_w200"), (m, "lightgbm")]
    lines += [f"| {a} | {b} | {diff(a, b)} |" for a, b in pairs if a in auc and b in auc]
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
