"""Prometheus text-format metrics of the scoring API, with no client library.

Counters and histograms live in plain dicts behind one lock; ``render()`` writes the exposition
format (version 0.0.4) that Prometheus scrapes from ``GET /metrics``.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PREFIX = "purchase_intent"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for le, c in zip(list(self.buckets) + ["+Inf"], self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.9g}" if labels else f"{name}_sum {self.sum:.9g}")
        out.append(f"{name}_count{{{labels}}} {self.n}" if labels else f"{name}_count {self.n}")
        return out


def _labels(**kv: str) -> str:
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return ",".join(f'{k}="{esc(v)}"' for k, v in kv.items())


class Metrics:
    """Requests, latency, errors by kind, the score distribution and the time split of a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.errors: dict[str, int] = defaultdict(int)
        self.scores = _Histogram(SCORE_BUCKETS)
        self.stages: dict[str, _Histogram] = {}
        self.reloads: dict[str, int] = defaultdict(int)
        self.last_reload_success: float | None = None  # epoch seconds

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, method, status)] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def score(self, probabilities) -> None:
        with self._lock:
            for p in probabilities:
                self.scores.observe(float(p))

    def stage(self, name: str, seconds: float) -> None:
        with self._lock:
            self.stages.setdefault(name, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def reload(self, outcome: str) -> None:
        with self._lock:
            self.reloads[outcome] += 1

    def reload_succeeded(self, at: float) -> None:
        with self._lock:
            self.last_reload_success = at

    def render(self, model_info: dict[str, str] | None = None,
               onnx_fallbacks: dict[str, int] | None = None) -> str:
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total HTTP requests by endpoint, method and status code.",
                     f"# TYPE {p}_requests_total counter"]
            for (ep, m, s), n in sorted(self.requests.items()):
                lines.append(f"{p}_requests_total{{{_labels(endpoint=ep, method=m, status=str(s))}}} {n}")
            lines += [f"# HELP {p}_request_duration_seconds Request latency by endpoint.",
                      f"# TYPE {p}_request_duration_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                lines += h.lines(f"{p}_request_duration_seconds", _labels(endpoint=ep))
            lines += [f"# HELP {p}_errors_total Rejected or failed requests by kind "
                      "(auth, validation, too_large, not_found, internal).",
                      f"# TYPE {p}_errors_total counter"]
            for kind, n in sorted(self.errors.items()):
                lines.append(f"{p}_errors_total{{{_labels(kind=kind)}}} {n}")
            lines += [f"# HELP {p}_score Distribution of the probabilities served.",
                      f"# TYPE {p}_score histogram"]
            lines += self.scores.lines(f"{p}_score", "")
            lines += [f"# HELP {p}_stage_seconds Time inside a scoring request by stage "
                      "(parse, prepare, features, sequences, model).",
                      f"# TYPE {p}_stage_seconds histogram"]
            for st, h in sorted(self.stages.items()):
                lines += h.lines(f"{p}_stage_seconds", _labels(stage=st))
            lines += [f"# HELP {p}_reloads_total Model swaps by outcome.", f"# TYPE {p}_reloads_total counter"]
            for outcome, n in sorted(self.reloads.items()):
                lines.append(f"{p}_reloads_total{{{_labels(outcome=outcome)}}} {n}")
            lines += [f"# HELP {p}_reload_failures_total Reloads that failed (the previous run kept serving).",
                      f"# TYPE {p}_reload_failures_total counter",
                      f"{p}_reload_failures_total {self.reloads.get('failed', 0)}"]
            if self.last_reload_success is not None:
                lines += [f"# HELP {p}_last_reload_success_timestamp_seconds When the run now served was loaded.",
                          f"# TYPE {p}_last_reload_success_timestamp_seconds gauge",
                          f"{p}_last_reload_success_timestamp_seconds {self.last_reload_success:.3f}"]
        lines += [f"# HELP {p}_onnx_fallbacks_total Models running PyTorch as ONNX Runtime failed, by reason.",
                  f"# TYPE {p}_onnx_fallbacks_total counter"]
        for reason, n in sorted((onnx_fallbacks or {}).items()):
            lines.append(f"{p}_onnx_fallbacks_total{{{_labels(reason=reason)}}} {n}")
        if model_info:
            lines += [f"# HELP {p}_model_info The run being served.", f"# TYPE {p}_model_info gauge",
                      f"{p}_model_info{{{_labels(**model_info)}}} 1"]
        return "\n".join(lines) + "\n"
