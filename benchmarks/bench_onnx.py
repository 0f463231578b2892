"""PyTorch against ONNX Runtime for Transformer inference, measured in the same run.

For each preset a classifier is fitted briefly on random sequences, saved (which exports
``model.onnx``) and loaded back, then scored through ``predict_proba`` with
``PURCHASE_INTENT_INFERENCE=torch`` and ``=onnx`` in alternating rounds (so that a change in
the machine's load hits both alike):

* per-request latency: one example of full length (no padding to trim), p50 / p99 in ms;
* small batches (``--batch-sizes``): ms per call and per example, to see where batching pays;
* throughput: examples/s on a batch of ``--batch`` full-length examples.

It also prints the largest probability difference between the two paths::

    .venv/bin/python benchmarks/bench_onnx.py                          # tiny and small, length 200
    .venv/bin/python benchmarks/bench_onnx.py --presets small --requests 500 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as purchase_intent/__init__.py does, before torch loads

import numpy as np
import torch

from purchase_intent.models.classifier import ONNX_BATCH_SIZE, TransformerClassifier
from purchase_intent.models.onnx_inference import INFERENCE_ENV
from purchase_intent.sequences import SEQUENCE_FIELDS, SequenceVocab

N_TABULAR = 40


def make_data(n: int, T: int, sizes: dict, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Full-length random sequences (worst case: nothing to trim) and random tabular features."""
    rng = np.random.default_rng(seed)
    X = {f: rng.integers(1, sizes[f], size=(n, T)).astype(np.int32) for f in SEQUENCE_FIELDS}
    X["mask"] = np.ones((n, T), dtype=bool)
    X["tabular"] = rng.normal(size=(n, N_TABULAR)).astype(np.float32)
    return X, rng.integers(0, 2, size=n)


def rows(X: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in X.items()}


def timed(clf: TransformerClassifier, mode: str, X: dict, calls: int) -> list[float]:
    """Seconds of each of `calls` predict_proba(X) calls under `mode`."""
    os.environ[INFERENCE_ENV] = mode
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        clf.predict_proba(X)
        out.append(time.perf_counter() - t)
    return out


def compare(clf: TransformerClassifier, X: dict, calls: int, rounds: int) -> dict[str, list[float]]:
    """Alternating rounds of torch and onnx calls (after one warm-up call each)."""
    res: dict[str, list[float]] = {"torch": [], "onnx": []}
    for mode in res:
        timed(clf, mode, X, 2)
    for _ in range(rounds):
        for mode in res:
            res[mode] += timed(clf, mode, X, max(1, calls // rounds))
    return res


def bench_preset(name: str, T: int, requests: int, batch: int, batch_sizes: list[int], tmp: str) -> dict:
    vocab = SequenceVocab()
    sizes = vocab.field_sizes()
    os.environ.pop(INFERENCE_ENV, None)  # fit and load as a user would (auto)
    X, y = make_data(max(batch, 256), T, sizes)
    clf = TransformerClassifier(preset=name, max_seq_len=T, max_epochs=1, batch_size=128, vocab=vocab)
    clf.fit(rows(X, 0, 192), y[:192], X_valid=rows(X, 192, 256), y_valid=y[192:256])
    path = os.path.join(tmp, name)
    t = time.perf_counter()
    clf.save(path)
    save_s = time.perf_counter() - t
    clf = TransformerClassifier.load(path)
    assert clf.onnx_path_ is not None, "no model.onnx was written: is the onnx extra installed?"
    out = {"preset": name, "seq_len": T, "save_s": round(save_s, 2),
           "onnx_mb": round(os.path.getsize(clf.onnx_path_) / 2 ** 20, 1)}

    one = rows(X, 0, 1)
    lat = compare(clf, one, requests, rounds=4)
    for mode, v in lat.items():
        out[f"{mode}_b1_p50_ms"] = round(float(np.percentile(v, 50)) * 1e3, 2)
        out[f"{mode}_b1_p99_ms"] = round(float(np.percentile(v, 99)) * 1e3, 2)

    for b in batch_sizes:
        r = compare(clf, rows(X, 0, b), max(8, requests // (4 * b) * 4), rounds=2)
        for mode, v in r.items():
            out[f"{mode}_b{b}_ms"] = round(float(np.median(v)) * 1e3, 2)

    big = rows(X, 0, batch)
    thr = compare(clf, big, 4, rounds=2)
    for mode, v in thr.items():
        out[f"{mode}_b{batch}_ex_per_s"] = round(batch / float(np.median(v)))

    os.environ[INFERENCE_ENV] = "torch"
    p_torch = clf.predict_proba(big)[:, 1]
    os.environ[INFERENCE_ENV] = "onnx"
    p_onnx = clf.predict_proba(big)[:, 1]
    out["max_abs_prob_diff"] = float(np.max(np.abs(p_torch - p_onnx)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--seq-len", type=int, default=200)
    ap.add_argument("--requests", type=int, default=400, help="single-example calls per runtime")
    ap.add_argument("--batch", type=int, default=512, help="batch size of the throughput test")
    ap.add_argument("--batch-sizes", default="8,32", help="small batches: ms per call")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (ONNX Runtime uses the same)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, ONNX batch {ONNX_BATCH_SIZE}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            res = bench_preset(name, args.seq_len, args.requests, args.batch,
                               [int(b) for b in args.batch_sizes.split(",") if b], tmp)
            results.append(res)
            print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
