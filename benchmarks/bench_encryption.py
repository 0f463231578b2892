"""The cost of encryption at rest: `ingest` and `build` with and without an encryption key, alternating.

    python benchmarks/bench_encryption.py --users 10000 --days 90 --repeat 3
    python benchmarks/bench_encryption.py --data sim-1m.csv.gz --repeat 3   # e.g. from benchmarks/make_sim_data.py

Writes the simulated shop's log (``purchase_intent.simulate``, seeded) to a CSV.gz once (or takes
``--data``, a CSV.gz with the canonical columns), then runs
``ingest`` + ``build`` (user task, 28d lookback, 7d horizon and step) into a fresh workspace, once
without a key ("plain") and once with ``$PURCHASE_INTENT_ENCRYPTION_KEY`` set ("encrypted"), in the
order plain, encrypted, encrypted, plain, ... so that a change of the machine's load hits both alike.
Every round uses one fixed pseudonymisation key, and checks that both workspaces built the same
features (the same table once decrypted, up to float rounding). Prints one JSON line: events,
examples, the 1-minute load average before and after, per variant the median, min and max seconds
of ingest and build (wall, and CPU of all threads: less sensitive to a shared machine's load), and
per measure the ratio encrypted / plain of each round and their median (the goal: at most 1.3).
``--stream`` measures the path of encrypted logs too large for memory (scanned through Arrow by every query);
a variant that fails (e.g. out of memory) is reported under ``failures`` with its error's first line and
seconds, and its round is left out of the figures;
``--stream --spill-dir DIR`` that of large encrypted logs where DuckDB may spill to a folder the user
named (decrypted once into a temp table, whose blocks beyond the memory limit go to that folder).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from purchase_intent import memory, pipeline, storage
from purchase_intent.config import DataConfig, FeatureConfig, LabelConfig
from purchase_intent.privacy import KEY_ENV
from purchase_intent.simulate import SimConfig, write_events
from purchase_intent.workspace import Workspace

KEY = "benchmark key: not a secret, 0123456789abcdef"
KEYS = ("ingest_s", "build_s", "ingest_cpu_s", "build_cpu_s")  # wall and CPU (all threads of this process)


def one(data: Path, root: Path, encrypted: bool) -> dict:
    if encrypted:
        os.environ[storage.ENCRYPTION_KEY_ENV] = KEY
    else:
        os.environ.pop(storage.ENCRYPTION_KEY_ENV, None)
    try:
        ws = Workspace(root)
        t0, c0 = time.perf_counter(), time.process_time()
        pipeline.ingest(data, DataConfig(format="csv"), ws, progress=False)
        t1, c1 = time.perf_counter(), time.process_time()
        parts = list((root / "events").glob("part-*.parquet"))
        assert all(storage.is_encrypted_file(p) == encrypted for p in parts)
        events_bytes = sum(p.stat().st_size for p in parts)
        # what workspace.connect decides for these events (plain ones are always read in place)
        loaded = encrypted and storage.materializes(events_bytes, memory.duckdb_bytes(), memory.spill_dir() is not None)
        out = {"ingest_s": t1 - t0, "ingest_cpu_s": c1 - c0, "events_mib": round(events_bytes / 2 ** 20, 1),
               "events_loaded_once": loaded}
        try:
            built = pipeline.build(LabelConfig(lookback="28d", horizon="7d", step="7d"), FeatureConfig(), ws,
                                   quiet=True)
        except Exception as e:  # e.g. out of memory: recorded with its time, the round not compared
            out.update(build_s=time.perf_counter() - t1, build_cpu_s=time.process_time() - c1,
                       build_error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
            return out
        t2, c2 = time.perf_counter(), time.process_time()
        features = storage.read_frame(root / "examples" / "features.parquet")
        return {**out, "build_s": t2 - t1, "build_cpu_s": c2 - c1, "examples": len(built.examples),
                "features": features}
    finally:
        os.environ.pop(storage.ENCRYPTION_KEY_ENV, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a CSV(.gz) of canonical events instead of the simulated shop")
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each runs both variants")
    ap.add_argument("--stream", action="store_true",
                    help="scan encrypted events through the decrypting dataset at every query, as for logs whose "
                         "table would not fit in half of DuckDB's memory (storage.materializes; default: decrypted "
                         "once per connection into a temp table where it fits)")
    ap.add_argument("--spill-dir", default=None,
                    help="the folder an encrypted workspace's DuckDB may spill to ($PURCHASE_INTENT_SPILL_DIR); with "
                         "--stream: large encrypted events are then decrypted once into a temp table")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a fresh one under $TMPDIR)")
    args = ap.parse_args()
    if args.stream:
        storage.TABLE_BYTES_PER_FILE_BYTE = float("inf")
    if args.spill_dir:
        os.environ[memory.SPILL_DIR_ENV] = args.spill_dir
    os.environ.setdefault(KEY_ENV, "0" * 64)
    tmp = Path(tempfile.mkdtemp(prefix="bench-enc-", dir=args.tmp))
    try:
        if args.data:
            data = Path(args.data)
            with (gzip.open(data, "rt") if data.name.endswith(".gz") else open(data)) as f:
                n_events = sum(1 for _ in f) - 1  # the header
        else:
            data = tmp / "events.csv.gz"
            n_events = write_events(SimConfig(n_users=args.users, days=args.days, seed=0), data)
        load_before = os.getloadavg()[0]
        times: dict[str, dict[str, list[float]]] = {v: {k: [] for k in KEYS} for v in ("plain", "encrypted")}
        examples, failures, events_mib, loaded_once = None, [], {}, False
        for r in range(args.repeat):
            order = ("plain", "encrypted") if r % 2 == 0 else ("encrypted", "plain")
            feats, done = {}, {}
            for variant in order:
                root = tmp / f"ws-{r}-{variant}"
                res = done[variant] = one(data, root, variant == "encrypted")
                shutil.rmtree(root)
                print(f"round {r} {variant}: ingest {res['ingest_s']:.2f}s ({res['ingest_cpu_s']:.2f} CPU s), "
                      f"events {res['events_mib']} MiB{' (loaded once)' if res['events_loaded_once'] else ''}, "
                      f"build {res['build_s']:.2f}s ({res['build_cpu_s']:.2f} CPU s)"
                      f"{' FAILED: ' + res['build_error'] if 'build_error' in res else ''}, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
                events_mib[variant] = res["events_mib"]
                loaded_once = loaded_once or res["events_loaded_once"]
                if "build_error" in res:
                    failures.append({"round": r, "variant": variant, **res})
                    continue
                examples, feats[variant] = res["examples"], res["features"]
            if len(feats) < 2:  # a variant failed: the round is not compared
                continue
            for variant, res in done.items():
                for k in KEYS:
                    times[variant][k].append(res[k])
            # the same features (up to the order of float sums, which DuckDB's threads vary run to run)
            pd.testing.assert_frame_equal(feats["plain"], feats["encrypted"], check_exact=False, rtol=1e-9)
        source = {"data": str(args.data)} if args.data else {"users": args.users, "days": args.days}
        source["encrypted_events"] = "decrypted once per connection" if loaded_once else "streamed"
        source["spill_dir"] = args.spill_dir
        out = {"events": n_events, "examples": examples, **source,
               "events_mib": events_mib, "repeat": args.repeat, "load_before": round(load_before, 2),
               "load_after": round(os.getloadavg()[0], 2), "failures": failures}
        for variant, ts in times.items():
            if not all(ts.values()):  # no round compared
                continue
            out[variant] = {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                                "max": round(max(v), 3)} for k, v in ts.items()}
        for k in KEYS:  # the median of the rounds' own ratios: each round ran both variants back to back
            ratios = [e / p for e, p in zip(times["encrypted"][k], times["plain"][k])]
            if not ratios:
                continue
            out[f"ratio_{k[:-2]}"] = round(statistics.median(ratios), 3)
            out[f"ratios_{k[:-2]}"] = [round(x, 3) for x in ratios]
        print(json.dumps(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
