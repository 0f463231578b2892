"""Soak of the scoring API: many clients for minutes, good and hostile requests, hot swaps under load.

    python benchmarks/soak_serve.py --duration 600 --md benchmarks/results/soak.md

Sets up a workspace like ``bench_serve.py`` (its ``prepare``, ``request_bodies``, ``start_server``
are reused), with two LightGBM runs of different size. The server (``purchase-intent serve``, a
separate process on loopback) serves ``soak-live``, a copy of the first. Then:

1. idle: one client sends good requests for ``--idle`` seconds (the idle p99);
2. soak: ``--concurrency`` clients for ``--duration`` seconds on keep-alive connections, each
   request drawn from a fixed cycle: good scoring requests and, with share ``--hostile``, hostile
   ones (malformed JSON, wrong types, a body over the server's size limit, a missing API key);
   ``--swaps`` times, evenly spaced, ``soak-live`` is replaced on disk by the other run and the
   server gets SIGHUP (the answered model version must change);
3. the server's RSS is sampled every ``--rss-every`` seconds.

Reports: errors on good requests (anything but 200; the goal is zero), hostile requests answered
with a 5xx or not at all, the RSS slope after ``--warmup`` seconds (MB/min, least squares), good-request
p99 during the soak vs the idle p99 and vs the first minute after warm-up, and writes a Markdown
section (``--md``) and JSON (``--out``).
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, _free_port, prepare, request_bodies, start_server  # noqa: E402

LIVE = "soak-live"
HUGE_BYTES = 9 * 1024 * 1024  # over the server's 8 MiB default limit


def _request(body: bytes, auth: bool = True, content_length: int | None = None) -> bytes:
    head = "POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if auth:
        head += f"Authorization: Bearer {KEY}\r\n"
    n = len(body) if content_length is None else content_length
    return (head + f"Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n").encode() + body


def hostile_requests(good: bytes) -> dict[str, tuple[bytes, tuple[int, ...]]]:
    """Hostile requests by kind: (raw HTTP request, the statuses that count as a correct answer)."""
    doc = json.loads(good)
    wrong = {**doc, "events": [{**e, "ts": {"not": "a time"}, "price": "free"} for e in doc["events"][:5]]}
    return {
        "malformed_json": (_request(good[: len(good) // 2] + b"}}{"), (422,)),
        "wrong_types": (_request(json.dumps(wrong).encode()), (422,)),
        "not_a_list": (_request(json.dumps({"events": "view"}).encode()), (422,)),
        "missing_auth": (_request(good, auth=False), (401,)),
        # a body over the limit (Content-Length 9 MiB, its first 64 KiB sent): the server answers
        # 413 from the header and closes the connection
        "huge_body": (_request(b" " * 65536, content_length=HUGE_BYTES), (413,)),
    }


def plan(n: int, hostile_share: float, kinds: list[str], seed: int) -> list[str]:
    """A fixed cycle of request kinds ("good" or a hostile kind), shuffled once with ``seed``.

    The huge body is one hostile request in 20 (it costs a new connection); the others share the rest.
    """
    rng = np.random.default_rng(seed)
    n_hostile = int(round(n * hostile_share))
    small = [k for k in kinds if k != "huge_body"]
    hostile = ["huge_body" if i % 20 == 0 else small[i % len(small)] for i in range(n_hostile)]
    out = ["good"] * (n - n_hostile) + hostile
    rng.shuffle(out)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def model_version(port: int) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/model", headers={"Authorization": f"Bearer {KEY}"})
    return json.loads(c.getresponse().read())["version"]


def swap_run(ws_root: Path, source: str) -> None:
    """Replace ``runs/soak-live`` by a copy of ``runs/<source>`` (the directory is missing for
    one rename; a reload then would fail and keep the old run, which /readyz would show)."""
    runs_dir = ws_root / "runs"
    new, old = runs_dir / (LIVE + ".new"), runs_dir / (LIVE + ".old")
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(runs_dir / source, new)
    os.rename(runs_dir / LIVE, old)
    os.rename(new, runs_dir / LIVE)
    shutil.rmtree(old)


async def _drive(port: int, requests: dict[str, tuple[bytes, tuple[int, ...]]], cycle: list[str],
                 good: list[bytes], concurrency: int, duration: float, log: list) -> None:
    """``concurrency`` clients on keep-alive connections; appends (t, seconds, kind, status) to ``log``
    (status 0: no answer)."""
    t_start = time.monotonic()
    stop = t_start + duration
    good_req = [_request(b) for b in good]

    async def exchange(reader, writer, request: bytes) -> tuple[int, bool]:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            low = line.lower()
            if low.startswith(b"content-length:"):
                length = int(line[15:])
            elif low.startswith(b"connection:") and b"close" in low:
                close = True
        await reader.readexactly(length)
        return int(head[9:12]), close

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i * 7919
        while time.monotonic() < stop:
            kind = cycle[k % len(cycle)]
            request = good_req[k % len(good_req)] if kind == "good" else requests[kind][0]
            k += 1
            t0 = time.perf_counter()
            close = False
            try:
                status, close = await asyncio.wait_for(exchange(reader, writer, request), 60)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                status, close = 0, True
            log.append((time.monotonic() - t_start, time.perf_counter() - t0, kind, status))
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))


def drive(port, requests, cycle, good, concurrency, duration) -> list:
    log: list = []
    asyncio.run(_drive(port, requests, cycle, good, concurrency, duration, log))
    return log


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def p99(xs) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, 99)) if len(xs) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default="bench-soak-ws")
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--events", type=int, default=50, help="events per good request")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of the soak left out of the RSS slope")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of one client for the idle p99")
    ap.add_argument("--hostile", type=float, default=0.25, help="share of hostile requests")
    ap.add_argument("--swaps", type=int, default=2)
    ap.add_argument("--rss-every", type=float, default=5.0)
    ap.add_argument("--out", default="soak_serve.json")
    ap.add_argument("--md", default=None, help="write the Markdown section here")
    a = ap.parse_args()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    ws_root = Path(a.workspace)
    load_before = Path("/proc/loadavg").read_text().strip()

    # two runs of different size: the swaps alternate between them
    prepare(ws_root, ["lightgbm"], a.users, a.days, "small", reuse=True)
    from purchase_intent import pipeline
    from purchase_intent.config import TrainConfig
    from purchase_intent.workspace import Workspace

    ws = Workspace(ws_root)
    cfg = TrainConfig(min_positives=1, min_negatives=1)
    for run, n in (("soak-a", 100), ("soak-b", 60)):
        if not (ws.run_dir(run) / "run.json").exists():
            pipeline.train("lightgbm", run=run, params={"n_estimators": n}, train_cfg=cfg, workspace=ws, quiet=True)
    shutil.rmtree(ws.run_dir(LIVE), ignore_errors=True)
    shutil.copytree(ws.run_dir("soak-a"), ws.run_dir(LIVE))
    good = request_bodies(ws_root, a.events)
    requests = hostile_requests(good[0])
    cycle = plan(1000, a.hostile, list(requests), seed=0)

    port = _free_port()
    proc = start_server(ws_root, LIVE, port)
    try:
        drive(port, requests, ["good"], good, 1, 3.0)  # warm-up of the code paths
        idle = [x for x in drive(port, requests, ["good"], good, 1, a.idle) if x[3] == 200]
        idle_p99 = p99([x[1] for x in idle])

        rss: list[tuple[float, float]] = []
        swaps: list[dict] = []
        done = threading.Event()
        t_soak = time.monotonic()

        def sample() -> None:
            while not done.is_set():
                rss.append((time.monotonic() - t_soak, rss_mb(proc.pid)))
                done.wait(a.rss_every)

        def swapper() -> None:
            for i in range(a.swaps):
                at = a.duration * (i + 1) / (a.swaps + 1)
                if done.wait(max(0.0, t_soak + at - time.monotonic())):
                    return
                before = model_version(port)
                swap_run(ws_root, "soak-b" if i % 2 == 0 else "soak-a")
                proc.send_signal(signal.SIGHUP)
                t0 = time.monotonic()
                after = before
                while after == before and time.monotonic() - t0 < 60:
                    time.sleep(0.2)
                    after = model_version(port)
                swaps.append({"at_s": round(at, 1), "from": before, "to": after,
                              "seconds": round(time.monotonic() - t0, 2), "changed": after != before})

        threads = [threading.Thread(target=sample), threading.Thread(target=swapper)]
        for t in threads:
            t.start()
        log = drive(port, requests, cycle, good, a.concurrency, a.duration)
        done.set()
        for t in threads:
            t.join()
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
    load_after = Path("/proc/loadavg").read_text().strip()

    good_log = [x for x in log if x[2] == "good"]
    good_errors = sum(1 for x in good_log if x[3] != 200)
    hostile = {}
    for kind, (_, ok) in requests.items():
        xs = [x for x in log if x[2] == kind]
        hostile[kind] = {"n": len(xs), "expected": list(ok), "as_expected": sum(1 for x in xs if x[3] in ok),
                         "5xx": sum(1 for x in xs if x[3] >= 500), "no_answer": sum(1 for x in xs if x[3] == 0)}
    after_warm = [x[1] for x in good_log if x[0] >= a.warmup]
    first_min = [x[1] for x in good_log if a.warmup <= x[0] < a.warmup + 60]
    last_min = [x[1] for x in good_log if x[0] >= a.duration - 60]
    pts = np.array([r for r in rss if r[0] >= a.warmup])
    slope = float(np.polyfit(pts[:, 0] / 60, pts[:, 1], 1)[0]) if len(pts) >= 3 else float("nan")
    res = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "loadavg_before": load_before, "loadavg_after": load_after, "config": vars(a),
        "server_alive": alive, "requests": len(log), "good": len(good_log), "good_errors": good_errors,
        "good_rps": len(good_log) / a.duration, "hostile": hostile, "swaps": swaps,
        "idle_p99_ms": idle_p99, "soak_p99_ms": p99(after_warm), "first_minute_p99_ms": p99(first_min),
        "last_minute_p99_ms": p99(last_min), "rss_mb_start": rss[0][1] if rss else None,
        "rss_mb_end": rss[-1][1] if rss else None, "rss_slope_mb_per_min": slope,
    }
    Path(a.out).write_text(json.dumps(res, indent=2))
    md = markdown(res)
    print(md)
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(md)


def markdown(r: dict) -> str:
    c = r["config"]
    n_hostile = sum(h["n"] for h in r["hostile"].values())
    bad_hostile = sum(h["5xx"] + h["no_answer"] for h in r["hostile"].values())
    rows = "\n".join(f"| {k} | {h['n']:,} | {'/'.join(map(str, h['expected']))} | {h['as_expected']:,} | "
                     f"{h['5xx']} | {h['no_answer']} |" for k, h in r["hostile"].items())
    x_idle = r["soak_p99_ms"] / r["idle_p99_ms"]
    drift = r["last_minute_p99_ms"] / r["first_minute_p99_ms"]
    swaps = "; ".join(f"at {s['at_s']:.0f}s {s['from']} -> {s['to']} in {s['seconds']}s"
                      + ("" if s["changed"] else " (NOT swapped)") for s in r["swaps"]) or "none"
    return f"""## Soak: {c['concurrency']} clients, {c['duration']:.0f} s, hostile requests and hot swaps

Date {r['date']}; machine: {r['machine']} (shared VM); load average before `{r['loadavg_before']}`,
after `{r['loadavg_after']}`. Command:

    {r['command']}

LightGBM run (simulated shop, {c['users']:,} users, {c['days']} days; {c['events']} events per good request);
{c['concurrency']} keep-alive clients on loopback (one asyncio loop), {c['hostile']:.0%} of the requests hostile.

| | value |
|---|---|
| requests (good) | {r['requests']:,} ({r['good']:,}, {r['good_rps']:.1f}/s) |
| errors on good requests | **{r['good_errors']}** |
| hostile requests answered 5xx or not at all | **{bad_hostile}** of {n_hostile:,} |
| server alive at the end | {r['server_alive']} |
| hot swaps (SIGHUP, changed run) | {swaps} |
| RSS start -> end | {r['rss_mb_start']:.0f} MB -> {r['rss_mb_end']:.0f} MB |
| RSS slope after {c['warmup']:.0f} s warm-up | **{r['rss_slope_mb_per_min']:+.2f} MB/min** |
| p99 idle (1 client, {c['idle']:.0f} s) | {r['idle_p99_ms']:.1f} ms |
| p99 during the soak (good, after warm-up) | {r['soak_p99_ms']:.1f} ms = **{x_idle:.1f}x idle** |
| p99 first minute after warm-up -> last minute | {r['first_minute_p99_ms']:.1f} -> {r['last_minute_p99_ms']:.1f} ms \
({drift:.2f}x) |

| hostile kind | n | expected | as expected | 5xx | no answer |
|---|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
