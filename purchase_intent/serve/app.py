"""The real-time scoring API: FastAPI app, the run loaded in `lifespan`, hot-swappable.

    PURCHASE_INTENT_API_KEYS=change-me-please purchase-intent serve --run lightgbm --port 8000
    curl -s localhost:8000/v1/score -H 'Authorization: Bearer change-me-please' \\
         -H 'Content-Type: application/json' \\
         -d '{"user_id": "u1", "events": [{"ts": "2017-12-02T10:00:00Z", "event": "view", "item_id": "i1"}]}'

Routes: ``POST /v1/score``, ``POST /v1/score/batch``, ``GET /v1/users/{user_id}/score`` (from the
workspace's events), ``POST /v1/admin/reload`` (swap in a run; ``kill -HUP`` reloads the current
one; a failed reload keeps the old run serving and shows in ``/readyz`` "reload" and ``/metrics``),
``GET /v1/model``, ``GET /metrics`` (Prometheus), and without a key ``GET /healthz``,
``GET /readyz``, ``/docs``; they live in ``serve/routes.py`` and score through ``serve/scoring.py``
(the numpy twins of the training feature and sequence SQL for user-task runs; that SQL itself over
an in-memory DuckDB for session-task runs and known users). Request user ids are pseudonymised with
the workspace key, as at ingest. Runs are only ever loaded from the configured runs directory.
"""
import asyncio
import json
import logging
import re
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import pidfile
from .metrics import Metrics
from .routes import router
from .schemas import BatchRequest, ScoreRequest
from .scoring import ApiError, ServeState
from .settings import API_KEYS_ENV, ServeSettings

# the parts of a pydantic error location that name a union member's validator, not a field of the request
_INTERNAL_LOC = re.compile(r"^(function-|constrained-|json-or-python|lax-|strict-|tagged-union|union\[|literal\[|"
                           r"(str|int|float|bool|bytes)$)")

log = logging.getLogger("purchase_intent.serve")


def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI app; the run is loaded (and SIGHUP wired to a reload) in `lifespan`."""
    if not settings.api_keys:
        raise ValueError(f"no API key: set {API_KEYS_ENV} (comma-separated) or pass --api-key-file")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serve = ServeState(settings)
        loop = asyncio.get_running_loop()
        hup = False
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            try:
                loop.add_signal_handler(signal.SIGHUP,
                                        lambda: loop.run_in_executor(None, _reload_quietly, app.state.serve))
                hup = True
            except (NotImplementedError, RuntimeError) as e:  # no signals on this loop: reload via the API
                log.warning("SIGHUP reload is not available (%s: %s); use POST /v1/admin/reload",
                            type(e).__name__, e)
        record = _record_server(settings) if settings.record_pid else None
        yield
        if record is not None:
            pidfile.unregister(record)
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        app.state.serve.close()

    app = FastAPI(title="purchase-intent scoring API", version="1", lifespan=lifespan,
                  description="Probability that a shopper buys within the run's horizon, from their recent events.")
    app.add_middleware(_Observe, settings=settings, app_ref=app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        app.state.serve.metrics.error(exc.kind)
        return JSONResponse({"detail": [{"loc": exc.field.split("."), "msg": exc.message}],
                             "message": f"{exc.field}: {exc.message}"}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        app.state.serve.metrics.error("validation")
        detail, seen = [], set()
        for e in exc.errors():  # pydantic's union-member tags out of the field path, one error per field
            loc = [str(x) for x in e.get("loc", ()) if not _INTERNAL_LOC.match(str(x))]
            if tuple(loc) in seen:
                continue
            seen.add(tuple(loc))
            detail.append({"loc": loc, "msg": str(e.get("msg", "")).removeprefix("Value error, "),
                           "type": str(e.get("type", ""))})
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in detail[:5])
        return JSONResponse({"detail": detail, "message": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # 401, 404, 405, 413: one shape
        text = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        loc, msg = (["body"], text.removeprefix("body: ")) if text.startswith("body: ") else ([], text)
        return JSONResponse({"detail": [{"loc": loc, "msg": msg}], "message": text}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        app.state.serve.metrics.error("internal")
        return JSONResponse({"detail": "internal error", "message": f"{type(exc).__name__}"}, status_code=500)

    app.include_router(router)
    _openapi_with_bodies(app, (ScoreRequest, BatchRequest))
    return app


def _openapi_with_bodies(app, models) -> None:
    """Make ``app.openapi()`` also list the request body models that no route parameter names."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in models:
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
        return app.openapi_schema

    app.openapi = openapi


def _record_server(settings: ServeSettings):
    """This process in ``<runs dir>/.servers/`` (for `retrain`'s reload signal); a runs directory
    that cannot be written still serves, with a warning."""
    try:
        return pidfile.register(settings.runs_path, settings.run, settings.host, settings.port)
    except OSError as e:
        log.warning("cannot record this server in %s (%s): `retrain` will not signal it; reload with kill -HUP",
                    settings.runs_path, e.strerror or e)
        return None


def _reload_quietly(st: ServeState) -> None:
    """SIGHUP: reload the current run. A bad run on disk must not take the server down: the old
    run keeps serving and the failure shows in /readyz ("reload"), /metrics and the log."""
    try:
        st.reload(None)
    except Exception as e:
        log.error("reload failed, still serving %s: %s: %s",
                  st.current.info["version"] if st.current else None, type(e).__name__, e)


class _Observe:
    """ASGI middleware: request count and latency by route, and the body size limit (413)."""

    def __init__(self, app, settings: ServeSettings, app_ref):
        self.app, self.max_bytes, self.app_ref = app, settings.max_body_bytes, app_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = scope["pi.t0"] = time.perf_counter()
        status = {"code": 500}
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                status["code"] = 413
                await _send_413(send, self.max_bytes)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise HTTPException(413, f"body: request body larger than {self.max_bytes} bytes")
                return message

            async def observed_send(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            await self.app(scope, limited_receive, observed_send)
        finally:
            metrics: Optional[Metrics] = getattr(getattr(self.app_ref.state, "serve", None), "metrics", None)
            if metrics is not None:
                if status["code"] == 413:
                    metrics.error("too_large")
                endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.request(endpoint, scope.get("method", ""), status["code"], time.perf_counter() - t0)


async def _send_413(send, max_bytes: int) -> None:
    body = json.dumps({"detail": [{"loc": ["body"], "msg": f"request body larger than {max_bytes} bytes"}],
                       "message": f"body: request body larger than {max_bytes} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
