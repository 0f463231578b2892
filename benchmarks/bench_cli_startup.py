"""How long the `purchase-intent` command takes to answer a mistyped command, a mistyped flag and --help,
and to run the data steps (simulate, ingest, build) on a small shop, where start-up is most of the time.

    .venv/bin/python benchmarks/bench_cli_startup.py --repeat 10 --src before=/tmp/head-wt --src after=.

Each case runs ``purchase_intent.cli.main`` in a fresh Python process (as the console script does),
with ``PYTHONPATH`` set to each ``--src`` tree in turn, alternating trees case by case so that both
see the same machine load. Reported: the median and min-max wall seconds per case and tree, and the
ratio of the medians to the first tree's. Every case must end with the exit status argparse gives
(2 for a mistake, 0 for help, 0 for a step); a tree that answers otherwise is reported as failing.
The steps run in that order in a fresh folder per tree and round: ``simulate`` writes the shop's log
(``--users 200 --days 30``, seeded: the same file for every tree), ``ingest`` reads it into a new
workspace and ``build`` builds it (``--lookback 7d --horizon 3d --step 3d``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "mistyped command (`buld`)": (["buld"], 2),
    "mistyped flag (`build --lookbak 3d`)": (["build", "--lookbak", "3d"], 2),
    "`score --help`": (["score", "--help"], 0),
}
# the data steps, in this order, in one fresh folder ({d}) per tree and round
STEPS = {
    "`simulate` (200 users x 30 days)": ["simulate", "--users", "200", "--days", "30", "--out", "{d}/sim.csv"],
    "`ingest` of that log (CSV)": ["--workspace", "{d}/ws", "ingest", "{d}/sim.csv", "--format", "csv"],
    "`build` of it": ["--workspace", "{d}/ws", "build", "--lookback", "7d", "--horizon", "3d", "--step", "3d"],
}
RUN = "import sys; from purchase_intent.cli import main; sys.exit(main(sys.argv[1:]))"


def once(src: Path, argv: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(src), "PURCHASE_INTENT_PSEUDONYM_KEY": "0" * 64}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN, *argv], env=env, cwd=src, capture_output=True)
    return time.perf_counter() - t0, done.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", action="append", required=True, metavar="NAME=DIR", help="a source tree (repeatable)")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    trees = {}
    for spec in args.src:
        name, _, path = spec.partition("=")
        if not (Path(path) / "purchase_intent" / "cli.py").is_file():
            raise SystemExit(f"error: --src {spec}: no purchase_intent/cli.py under {path}")
        trees[name] = Path(path).resolve()
    load0 = open("/proc/loadavg").read().split()[:3]
    cases = [*CASES, *STEPS]
    times = {(c, t): [] for c in cases for t in trees}
    bad = set()
    for _ in range(args.repeat):
        for case, (argv, want) in CASES.items():
            for name, src in trees.items():
                secs, rc = once(src, argv)
                times[(case, name)].append(secs)
                if rc != want:
                    bad.add((case, name, rc))
        for name, src in trees.items():
            d = tempfile.mkdtemp(prefix="bench-cli-")
            try:
                for case, argv in STEPS.items():
                    secs, rc = once(src, [a.format(d=d) for a in argv])
                    times[(case, name)].append(secs)
                    if rc != 0:
                        bad.add((case, name, rc))
            finally:
                shutil.rmtree(d, ignore_errors=True)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"{args.repeat} runs per case and tree, alternating; load average {' '.join(load0)} -> {' '.join(load1)}")
    first = next(iter(trees))
    names = list(trees)
    print("| case | " + " | ".join(f"{n} s, median (min-max)" for n in names) + " | "
          + " | ".join(f"{n} / {first}" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for case in cases:
        med = {n: sorted(times[(case, n)])[len(times[(case, n)]) // 2] for n in names}
        cells = [f"{med[n]:.2f} ({min(times[(case, n)]):.2f}-{max(times[(case, n)]):.2f})" for n in names]
        print(f"| {case} | " + " | ".join(cells) + " | " + " | ".join(f"{med[n] / med[first]:.2f}x" for n in names[1:])
              + " |")
    for case, name, rc in sorted(bad):
        print(f"FAILED: {name}: {case} exited {rc}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
