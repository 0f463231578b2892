"""Latency and throughput of the scoring API, and batch scoring throughput, on the simulated shop.

    python benchmarks/bench_serve.py                                   # logreg, lightgbm, transformer
    python benchmarks/bench_serve.py --models lightgbm --duration 60 --concurrency 32   # the soak test
    python benchmarks/bench_serve.py --workspace pi-workspace --reuse  # runs already trained there
    python benchmarks/bench_serve.py --models lightgbm,lightgbm_emb    # pretrains the encoder first (1 epoch)

Steps: simulate a shop (``--users``, ``--days``), ingest, build (28d lookback, 7d horizon), train
each model (the Transformer with ``--preset``, one epoch: speed, not accuracy, is measured), time
``score`` over all active users (users/s), then for each model start ``purchase-intent serve`` as
a separate process on loopback and drive it from this process with ``--concurrency`` clients
(one keep-alive HTTP connection each; ``--client asyncio``, the default, runs them all on one
event loop writing raw HTTP/1.1, so the load generator takes little of the CPU the server
shares; ``--client threads`` uses one ``http.client`` thread per client), every request holding
``--events`` events of one real user. Prints a Markdown table and writes JSON (``--out``): p50/p95/p99
latency, requests/s, errors, and the mean time split inside a request (parse, prepare, features, sequences, model) read
from ``/metrics``; ``--soak 60`` then holds 32 clients for 60 s per model and counts errors.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

KEY = "bench-key-0123456789"
STAGES = ("parse", "prepare", "features", "sequences", "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(ws_root: Path, models: list[str], users: int, days: int, preset: str, reuse: bool) -> None:
    """Simulated shop -> workspace with one run per model (skipped with --reuse)."""
    from purchase_intent import pipeline
    from purchase_intent.config import DataConfig, LabelConfig, TrainConfig
    from purchase_intent.models import PRETRAINED_MODELS
    from purchase_intent.pretrain import PretrainConfig, pretrain
    from purchase_intent.simulate import SimConfig, write_events
    from purchase_intent.workspace import Workspace

    ws = Workspace(ws_root)
    if reuse and all((ws.run_dir(m) / "run.json").exists() for m in models):
        return
    ws_root.mkdir(parents=True, exist_ok=True)
    data = ws_root / f"sim-{users}u-{days}d.csv.gz"
    if not data.exists():
        write_events(SimConfig(n_users=users, days=days, seed=0), data)
    if not ws.part_paths():
        pipeline.ingest(data, DataConfig(format="csv"), ws, progress=False)
    pipeline.build(LabelConfig(lookback="28d", horizon="7d", step="7d"), workspace=ws, quiet=True)
    if set(models) & PRETRAINED_MODELS:  # one pretraining epoch: speed, not accuracy, is measured
        pretrain(ws, PretrainConfig(epochs=1))
    for m in models:
        params = {"preset": preset, "max_epochs": 1} if m == "transformer" else None
        train_cfg = TrainConfig(min_positives=1, min_negatives=1)
        pipeline.train(m, params=params, train_cfg=train_cfg, workspace=ws, quiet=True)


def request_bodies(ws_root: Path, n_events: int, n_bodies: int = 50) -> list[bytes]:
    """Request bodies of users with the most events (their last n_events), as raw JSON bytes."""
    from purchase_intent.workspace import Workspace

    con = Workspace(ws_root).connect()
    df = con.execute(f"""
        SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC) AS k,
                              count(*) OVER (PARTITION BY user_id) AS n FROM events)
        WHERE k <= {n_events} AND n >= {n_events}
        ORDER BY user_id, ts""").df()
    bodies = []
    for uid, g in df.groupby("user_id", sort=True):
        events = [{"ts": t.isoformat() + "Z", "event": e, "item_id": i, "category": c,
                   "price": None if pd.isna(p) else float(p), "session_id": s}
                  for t, e, i, c, p, s in zip(g["ts"], g["event"], g["item_id"], g["category"], g["price"],
                                              g["session_id"])]
        bodies.append(json.dumps({"user_id": uid, "events": events}).encode())
        if len(bodies) >= n_bodies:
            break
    if not bodies:
        raise SystemExit(f"no user has {n_events} events: simulate more days or users")
    return bodies


def start_server(ws_root: Path, run: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PURCHASE_INTENT_API_KEYS": KEY}
    cmd = [sys.executable, "-m", "purchase_intent.cli", "--workspace", str(ws_root), "serve", "--run", run,
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server for {run} exited with {proc.returncode}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready")


def load(port: int, bodies: list[bytes], concurrency: int, duration: float, client: str = "asyncio") -> dict:
    """`concurrency` clients, each on one keep-alive connection, sending for `duration` seconds.

    ``client="asyncio"``: one event loop writing pre-built HTTP/1.1 requests on raw sockets (light:
    it shares the machine with the server); ``"threads"``: one ``http.client`` thread per client.
    """
    run = _load_asyncio if client == "asyncio" else _load_threads
    lat, errors, wall = run(port, bodies, concurrency, duration)
    all_lat = np.array([x for xs in lat for x in xs]) * 1e3
    return {"concurrency": concurrency, "requests": int(all_lat.size), "errors": int(errors),
            "p50_ms": float(np.percentile(all_lat, 50)), "p95_ms": float(np.percentile(all_lat, 95)),
            "p99_ms": float(np.percentile(all_lat, 99)), "rps": all_lat.size / wall}


def _load_threads(port: int, bodies: list[bytes], concurrency: int, duration: float):
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop = time.monotonic() + duration
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        k = i
        while time.monotonic() < stop:
            body = bodies[k % len(bodies)]
            k += concurrency
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/score", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            lat[i].append(time.perf_counter() - t0)
            errors[i] += not ok
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, sum(errors), time.perf_counter() - t0


def _load_asyncio(port: int, bodies: list[bytes], concurrency: int, duration: float):
    import asyncio

    requests = [(f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b
                for b in bodies]
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0]

    async def exchange(reader, writer, request: bytes) -> bool:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        return head[9:12] == b"200"

    async def client(i: int, stop: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        while time.monotonic() < stop:
            request = requests[k % len(requests)]
            k += concurrency
            t0 = time.perf_counter()
            try:
                ok = await asyncio.wait_for(exchange(reader, writer, request), 60)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            lat[i].append(time.perf_counter() - t0)
            errors[0] += not ok
        writer.close()

    async def main() -> float:
        t0 = time.perf_counter()
        stop = time.monotonic() + duration
        await asyncio.gather(*(client(i, stop) for i in range(concurrency)))
        return time.perf_counter() - t0

    try:
        import uvloop

        wall = uvloop.run(main())
    except ImportError:
        wall = asyncio.run(main())
    return lat, errors[0], wall


def stage_split(port: int) -> dict[str, float]:
    """Mean milliseconds per request in each stage, from the server's /metrics."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = c.getresponse().read().decode()
    out = {}
    for stage in STAGES:
        s = re.search(rf'purchase_intent_stage_seconds_sum{{stage="{stage}"}} (\S+)', text)
        n = re.search(rf'purchase_intent_stage_seconds_count{{stage="{stage}"}} (\S+)', text)
        if s and n and float(n.group(1)):
            out[stage] = 1e3 * float(s.group(1)) / float(n.group(1))
    return out


def bench_batch(ws_root: Path, run: str) -> dict:
    import tempfile

    from purchase_intent.score import ScoreConfig, score

    with tempfile.TemporaryDirectory() as d:
        r = score(run, Path(d) / "scores.parquet", ScoreConfig(), workspace=ws_root, progress=False)
    return {"users": r.n_scored, "seconds": r.seconds, "users_per_s": r.users_per_second}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default="bench-serve-ws")
    ap.add_argument("--models", default="logreg,lightgbm,transformer")
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--preset", default="small", help="Transformer preset")
    ap.add_argument("--events", type=int, default=200, help="events per request")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    ap.add_argument("--reuse", action="store_true", help="use the runs already in the workspace")
    ap.add_argument("--soak", type=float, default=0.0, help="then hold 32 clients for this many seconds per model")
    ap.add_argument("--no-batch", action="store_true", help="skip the batch scoring measurement")
    ap.add_argument("--client", choices=("asyncio", "threads"), default="asyncio",
                    help="load generator: one asyncio loop on raw sockets (default, light) or http.client threads")
    ap.add_argument("--out", default="bench_serve.json")
    a = ap.parse_args()
    ws_root = Path(a.workspace)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    prepare(ws_root, models, a.users, a.days, a.preset, a.reuse)
    bodies = request_bodies(ws_root, a.events)
    results = []
    for m in models:
        batch = {"users_per_s": float("nan")} if a.no_batch else bench_batch(ws_root, m)
        port = _free_port()
        proc = start_server(ws_root, m, port)
        try:
            load(port, bodies, 1, 2.0, a.client)  # warm-up (its stage times are part of the split)
            split = {}
            for conc in [int(c) for c in a.concurrency.split(",")]:
                row = {"model": m, **load(port, bodies, conc, a.duration, a.client)}
                results.append(row)
                if not split:  # the split of the first (lowest) level: no queueing inside the stages
                    split = stage_split(port)
            if a.soak:
                results.append({"model": m, "soak": True, **load(port, bodies, 32, a.soak, a.client)})
            for row in results:
                if row["model"] == m:
                    row["batch_users_per_s"] = batch["users_per_s"]
                    row["split_ms"] = split
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"| model | conc | p50 ms | p95 ms | p99 ms | req/s | errors | {'/'.join(STAGES)} ms | batch users/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r.get("split_ms", {})
        split = "/".join(f"{s.get(k, 0.0):.2f}" for k in STAGES)
        conc = f"{r['concurrency']} (soak {a.soak:.0f}s)" if r.get("soak") else r["concurrency"]
        print(f"| {r['model']} | {conc} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['rps']:.1f} | {r['errors']} | {split} | {r['batch_users_per_s']:,.0f} |")
    Path(a.out).write_text(json.dumps({"config": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
