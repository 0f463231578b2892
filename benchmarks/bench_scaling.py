"""Scaling study: Transformer size x pretraining on / off x fraction of labelled users.

    .venv/bin/python benchmarks/bench_scaling.py --users 3000 --days 63 --presets tiny,small \\
        --fractions 0.05,0.1,0.25,0.5,1.0 --out benchmarks/results/scaling.md --plot docs/scaling.png

One simulated shop (seed 0, default LabelConfig: 28d lookback, 7d horizon, weekly cutoffs; the test
split is the last period). For each preset the encoder is pretrained once (``purchase-intent pretrain``'s
code, masked objective, on every user's events before the first test cutoff, labelled or not). Then for
each fraction f of the users whose train examples keep their labels (the same seeded draw of users for
every model), three models are fitted on those train examples (valid for early stopping and calibration)
and scored on the whole test split: LightGBM, the from-scratch ``transformer`` of that preset
(pretraining off) and ``transformer_pt`` on the preset's encoder (pretraining on). Test ROC-AUC, PR-AUC
and training seconds; differences to LightGBM with paired bootstrap 95% intervals. One seed.

``--min-steps-per-epoch 1,16`` fits each Transformer once per value (1 = the batch as given, however small
the train set; 16 = the default): an A/B of that rule on the same examples in one run. The pseudonym
key is fixed (``$PURCHASE_INTENT_PSEUDONYM_KEY``, else a constant), so that a rerun draws the same users.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from purchase_intent import pipeline
from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
from purchase_intent.evaluate import paired_auc_difference
from purchase_intent.pretrain import PretrainConfig, pretrain
from purchase_intent.runs import load_built, model_inputs, model_vocab
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace


def fit_and_score(name, params, built, tr, va, te, ws):
    t0 = time.perf_counter()
    cfg = TrainConfig(min_positives=10, min_negatives=10, seed=0)
    model = pipeline.fit_model(name, params, built, tr, va, ws, cfg)
    seconds = time.perf_counter() - t0
    return model.predict_proba(model_inputs(name, built, te, ws, model_vocab(model)))[:, 1], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--days", type=int, default=63)
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--min-steps-per-epoch", default="16", help="comma-separated values to compare (e.g. 1,16)")
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--workdir", default="bench-scaling")
    ap.add_argument("--out", default="benchmarks/results/scaling.md")
    ap.add_argument("--plot", default="docs/scaling.png")
    args = ap.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    fractions = [float(f) for f in args.fractions.split(",")]
    min_steps = [int(v) for v in args.min_steps_per_epoch.split(",")]
    # the pseudonyms order the users the fractions are drawn from: one key, one draw
    os.environ.setdefault("PURCHASE_INTENT_PSEUDONYM_KEY", "bench-scaling-not-secret")
    load0 = open("/proc/loadavg").read().split()[:3]
    t_start = time.perf_counter()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ws = Workspace(work / "ws")
    shop = work / "shop.csv.gz"
    write_events(SimConfig(n_users=args.users, days=args.days, seed=0), shop)
    pipeline.ingest(shop, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(), workspace=ws, quiet=True)
    built = load_built(ws)
    y = built.examples["label"].to_numpy()
    tr, va, te = (np.flatnonzero(built.mask(s)) for s in ("train", "valid", "test"))
    yt = y[te]
    users = np.sort(built.examples["user_id"].iloc[tr].unique())
    order = np.random.default_rng(0).permutation(len(users))  # nested: a smaller fraction's users are in a larger's
    print(f"examples: train {len(tr):,} valid {len(va):,} test {len(te):,} ({int(yt.sum())} test positives)")

    encoders, pretrain_s = {}, {}
    for p in presets:
        t0 = time.perf_counter()
        enc = pretrain(ws, PretrainConfig(preset=p, epochs=args.pretrain_epochs))
        pretrain_s[p] = time.perf_counter() - t0
        encoders[p] = work / f"encoder-{p}"
        shutil.rmtree(encoders[p], ignore_errors=True)
        shutil.copytree(enc, encoders[p])
        print(f"pretrained {p} in {pretrain_s[p]:.0f}s")

    rows = []  # (fraction, n_train, model, preset, pretrained, p, seconds)
    for f in fractions:
        keep = set(users[order[: max(1, int(round(len(users) * f)))]])
        sub = tr[built.examples["user_id"].iloc[tr].isin(keep).to_numpy()]
        p_lgb, s_lgb = fit_and_score("lightgbm", {}, built, sub, va, te, ws)
        rows.append((f, len(sub), "lightgbm", "-", False, "-", p_lgb, s_lgb))
        for preset in presets:
            for name, params, on in (("transformer", {"preset": preset}, False),
                                     ("transformer_pt", {"encoder": str(encoders[preset])}, True)):
                for k in min_steps:
                    p, s = fit_and_score(name, {**params, "min_steps_per_epoch": k}, built, sub, va, te, ws)
                    rows.append((f, len(sub), name, preset, on, k, p, s))
                    print(f"{f:.0%} {name} {preset} min_steps {k}: {roc_auc_score(yt, p):.4f} ({s:.0f}s)", flush=True)
    load1 = open("/proc/loadavg").read().split()[:3]

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"## Scaling study: size x pretraining x labelled users ({today})", "",
             f"Command: `.venv/bin/python benchmarks/bench_scaling.py --users {args.users} --days {args.days} "
             f"--presets {args.presets} --fractions {args.fractions} --pretrain-epochs {args.pretrain_epochs} "
             f"--min-steps-per-epoch {args.min_steps_per_epoch} "
             f"--n-boot {args.n_boot} --out {args.out} --plot {args.plot}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared VM), load average "
             f"at start {' '.join(load0)}, at end {' '.join(load1)}; total {time.perf_counter() - t_start:.0f}s. "
             f"Simulator {args.users:,} users x {args.days} days; train {len(tr):,} examples of {len(users):,} users, "
             f"valid {len(va):,}, test {len(te):,} ({int(yt.sum())} positives). Pretraining (masked, "
             f"{args.pretrain_epochs} epochs, every user's events before the first test cutoff): "
             + ", ".join(f"{p} {s:.0f}s" for p, s in pretrain_s.items()) + ". One seed; test split.", "",
             "| labelled users | train examples | model | preset | pretrained | min steps/epoch | ROC-AUC | PR-AUC | "
             "fit s | ROC-AUC - lightgbm [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f, n, name, preset, on, k, p, s in rows:
        ref = next(r[6] for r in rows if r[0] == f and r[2] == "lightgbm")
        d = "-" if name == "lightgbm" else (lambda d: f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")(
            paired_auc_difference(yt, p, ref, n_boot=args.n_boot))
        lines.append(f"| {f:.0%} | {n:,} | {name} | {preset} | {'yes' if on else 'no'} | {k} | "
                     f"{roc_auc_score(yt, p):.4f} | {average_precision_score(yt, p):.4f} | {s:.0f} | {d} |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.plot:
        _plot(rows, yt, presets, fractions, Path(args.plot))


def _plot(rows, yt, presets, fractions, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], roc_auc_score, "test ROC-AUC"), (axes[1], average_precision_score,
                                                                          "test PR-AUC")):
        k = rows[-1][5]  # the last --min-steps-per-epoch value
        lgb = [metric(yt, r[6]) for r in rows if r[2] == "lightgbm"]
        ax.plot(fractions, lgb, "k-o", label="lightgbm")
        for preset in presets:
            for on, style in ((False, "--"), (True, "-")):
                vals = [metric(yt, r[6]) for r in rows if r[3] == preset and r[4] == on and r[5] == k]
                ax.plot(fractions, vals, style, marker="s",
                        label=f"transformer {preset}" + (" (pretrained)" if on else ""))
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:.0%}" for f in fractions])
        ax.set_xlabel("labelled users (share of the train split's)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
