"""Write the simulated shop's event log to a file, one day at a time, and time it.

    python benchmarks/make_sim_data.py --events 10_000_000 --out sim-10m.csv.gz
    python benchmarks/make_sim_data.py --users 20000 --days 90 --out sim.parquet

``--events N`` picks the number of users from a pilot run of 2,000 users with the same settings,
so the file holds about N events (each user's log depends on the number of users only through
the random stream, so the count is close, not exact). The format follows the extension
(.csv, .csv.gz, .parquet). Prints one JSON line: rows, users, days, seconds, events per second.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from purchase_intent.simulate import SimConfig, simulate, write_events


def users_for_events(cfg: SimConfig, n_events: int, pilot_users: int = 2_000) -> int:
    """Number of users whose simulated log has about ``n_events`` events (from a pilot run)."""
    pilot = len(simulate(replace(cfg, n_users=pilot_users)))
    return max(1, round(n_events * pilot_users / max(pilot, 1)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output file: .csv, .csv.gz or .parquet")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--events", type=lambda s: int(s.replace("_", "")), help="about this many events")
    size.add_argument("--users", type=int, default=SimConfig.n_users, help="number of users (default %(default)s)")
    p.add_argument("--days", type=int, default=SimConfig.days, help="days (default %(default)s)")
    p.add_argument("--seed", type=int, default=SimConfig.seed, help="seed (default %(default)s)")
    args = p.parse_args(argv)
    cfg = SimConfig(n_users=args.users, days=args.days, seed=args.seed)
    if args.events is not None:
        cfg = replace(cfg, n_users=users_for_events(cfg, args.events))
    t0 = time.perf_counter()
    rows = write_events(cfg, args.out)
    seconds = time.perf_counter() - t0
    result = {"out": args.out, "rows": rows, "users": cfg.n_users, "days": cfg.days, "seed": cfg.seed,
              "seconds": round(seconds, 2), "events_per_s": round(rows / max(seconds, 1e-9))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
