"""Prometheus metrics of the scoring API, kept and exposed by ``prometheus_client``.

Each app has its own :class:`prometheus_client.CollectorRegistry` (not the process-wide one), so
several apps in one process (tests, an A/B pair) count apart. Counters and histograms are the
library's own; what is only known at scrape time (the run served, ONNX fallbacks, the drift that
`purchase-intent monitor` found for that run) comes from one custom collector fed by ``render``.
``render()`` returns the text exposition format (0.0.4) that ``GET /metrics`` answers.

Drift gauges (from ``runs/<run>/monitor.json``, see ``purchase_intent.monitor``):
``purchase_intent_drift_psi{feature}``, ``purchase_intent_drift_score_psi``,
``purchase_intent_drift_positive_rate{window}``, ``purchase_intent_drift_live_roc_auc``,
``purchase_intent_drift_expected_roc_auc_lower``, ``purchase_intent_drift_detected`` (1 = drift)
and ``purchase_intent_drift_checked_timestamp_seconds``.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PREFIX = "purchase_intent"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ScrapeTime(Collector):
    """The metrics whose values are handed to ``Metrics.render`` at each scrape."""

    def __init__(self) -> None:
        self.model_info: Optional[dict[str, str]] = None
        self.onnx_fallbacks: dict[str, int] = {}
        self.drift: Optional[dict[str, Any]] = None

    def collect(self):
        p = PREFIX
        fb = CounterMetricFamily(f"{p}_onnx_fallbacks", "Models running PyTorch as ONNX Runtime failed, by reason.",
                                 labels=["reason"])
        for reason, n in sorted(self.onnx_fallbacks.items()):
            fb.add_metric([reason], n)
        yield fb
        if self.model_info:
            info = GaugeMetricFamily(f"{p}_model_info", "The run being served.", labels=list(self.model_info))
            info.add_metric([str(v) for v in self.model_info.values()], 1)
            yield info
        if self.drift:
            yield from drift_families(self.drift)


def drift_families(report: dict[str, Any]):
    """Gauge families of one ``monitor.json`` (as ``purchase_intent.monitor`` writes it)."""
    p = f"{PREFIX}_drift"
    psi = GaugeMetricFamily(f"{p}_psi", "Population stability index of each feature, latest window vs training.",
                            labels=["feature"])
    for f in report.get("features", []):
        if f.get("psi") is not None:
            psi.add_metric([str(f["name"])], float(f["psi"]))
    yield psi
    score = (report.get("score") or {}).get("psi")
    if score is not None:
        yield GaugeMetricFamily(f"{p}_score_psi", "Population stability index of the scores.", value=float(score))
    rate = GaugeMetricFamily(f"{p}_positive_rate", "Share of examples that bought, by window.", labels=["window"])
    for window, value in (report.get("positive_rate") or {}).items():
        if value is not None:
            rate.add_metric([str(window)], float(value))
    yield rate
    perf = report.get("performance") or {}
    if perf.get("roc_auc") is not None:
        yield GaugeMetricFamily(f"{p}_live_roc_auc", "ROC-AUC on the latest window with matured labels.",
                                value=float(perf["roc_auc"]))
    expected = (perf.get("expected") or {}).get("roc_auc_ci")
    if expected and expected[0] is not None:
        yield GaugeMetricFamily(f"{p}_expected_roc_auc_lower", "Lower end of the backtest's ROC-AUC interval.",
                                value=float(expected[0]))
    yield GaugeMetricFamily(f"{p}_detected", "1 when the last monitor found drift (see its verdict), else 0.",
                            value=1.0 if report.get("verdict") == "drift" else 0.0)
    if report.get("checked_at_epoch") is not None:
        yield GaugeMetricFamily(f"{p}_checked_timestamp_seconds", "When the drift was last measured.",
                                value=float(report["checked_at_epoch"]))


class Metrics:
    """Requests, latency, errors by kind, the score distribution and the time split of a request."""

    def __init__(self) -> None:
        p = PREFIX
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(f"{p}_requests", "HTTP requests by endpoint, method and status code.",
                                 ["endpoint", "method", "status"], registry=r)
        self._latency = Histogram(f"{p}_request_duration_seconds", "Request latency by endpoint.", ["endpoint"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._errors = Counter(f"{p}_errors", "Rejected or failed requests by kind "
                               "(auth, validation, too_large, not_found, internal).", ["kind"], registry=r)
        self._scores = Histogram(f"{p}_score", "Distribution of the probabilities served.", buckets=SCORE_BUCKETS,
                                 registry=r)
        self._stages = Histogram(f"{p}_stage_seconds", "Time inside a scoring request by stage "
                                 "(parse, prepare, features, sequences, model).", ["stage"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self._reloads = Counter(f"{p}_reloads", "Model swaps by outcome.", ["outcome"], registry=r)
        self._reload_failures = Counter(f"{p}_reload_failures",
                                        "Reloads that failed (the previous run kept serving).", registry=r)
        self._last_reload = Gauge(f"{p}_last_reload_success_timestamp_seconds",
                                  "When the run now served was loaded.", registry=r)
        self._scrape = _ScrapeTime()
        r.register(self._scrape)
        self._render_lock = threading.Lock()

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, method, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def score(self, probabilities) -> None:
        for p in probabilities:
            self._scores.observe(float(p))

    def stage(self, name: str, seconds: float) -> None:
        self._stages.labels(name).observe(seconds)

    def reload(self, outcome: str) -> None:
        self._reloads.labels(outcome).inc()
        if outcome == "failed":
            self._reload_failures.inc()

    def reload_succeeded(self, at: float) -> None:
        self._last_reload.set(at)

    def render(self, model_info: dict[str, str] | None = None, onnx_fallbacks: dict[str, int] | None = None,
               drift: dict[str, Any] | None = None) -> str:
        """The text exposition of every metric; ``model_info``, ``onnx_fallbacks`` and ``drift`` (a
        ``monitor.json``) are the values known at this scrape."""
        with self._render_lock:  # the scrape-time values belong to one scrape at a time
            self._scrape.model_info = model_info
            self._scrape.onnx_fallbacks = dict(onnx_fallbacks or {})
            self._scrape.drift = drift
            return generate_latest(self.registry).decode("utf-8")
