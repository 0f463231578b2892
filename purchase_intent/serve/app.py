"""The real-time scoring API: FastAPI app, the run loaded in `lifespan`, hot-swappable.

    PURCHASE_INTENT_API_KEYS=change-me-please purchase-intent serve --run lightgbm --port 8000
    curl -s localhost:8000/v1/score -H 'Authorization: Bearer change-me-please' \\
         -H 'Content-Type: application/json' \\
         -d '{"user_id": "u1", "events": [{"ts": "2017-12-02T10:00:00Z", "event": "view", "item_id": "i1"}]}'

Routes: ``POST /v1/score``, ``POST /v1/score/batch``, ``GET /v1/users/{user_id}/score`` (from the
workspace's events), ``POST /v1/admin/reload`` (swap in a run; ``kill -HUP`` reloads the current
one), ``GET /v1/model``, ``GET /metrics`` (Prometheus), and without a key ``GET /healthz``,
``GET /readyz``, ``/docs``. Features and sequences are computed by
``pipeline.inputs_for_examples``, the code that built the training features, over a per-thread
in-memory DuckDB holding only the request's events. Request user ids are pseudonymised with the
workspace key, as at ingest. Runs are only ever loaded from the configured runs directory.
"""
# no `from __future__ import annotations`: FastAPI reads the route annotations, and fastapi is
# imported inside create_app so that the CLI works without the serve extra.

import argparse
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Optional

from .metrics import Metrics
from .schemas import BatchItem, BatchRequest, BatchResponse, ModelInfo, ReloadRequest, ScoreRequest, ScoreResponse
from .scoring import ONE_US, ApiError, ServeState, predict, score_users
from .settings import API_KEYS_ENV, ServeSettings, read_api_keys

# ---------------------------------------------------------------------------------------------
# the app
def create_app(settings: ServeSettings):
    """The FastAPI app; the run is loaded (and SIGHUP wired to a reload) in `lifespan`."""
    from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    if not settings.api_keys:
        raise ValueError(f"no API key: set {API_KEYS_ENV} (comma-separated) or pass --api-key-file")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        app.state.serve = ServeState(settings)
        loop = asyncio.get_running_loop()
        hup = False
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _reload_quietly, app.state.serve))
                hup = True
            except (NotImplementedError, RuntimeError):
                pass
        yield
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        app.state.serve.close()

    app = FastAPI(title="purchase-intent scoring API", version="1", lifespan=lifespan,
                  description="Probability that a shopper buys within the run's horizon, from their recent events.")
    app.add_middleware(_Observe, settings=settings, app_ref=app)

    def state() -> ServeState:
        return app.state.serve

    async def require_key(request: Request) -> ServeState:  # async: no thread hop for a hash compare
        st = state()
        if not st.authorised(request.headers.get("authorization")):
            st.metrics.error("auth")
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})
        return st

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        state().metrics.error(exc.kind)
        return JSONResponse({"detail": [{"loc": exc.field.split("."), "msg": exc.message}],
                             "message": f"{exc.field}: {exc.message}"}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        state().metrics.error("validation")
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in detail[:5])
        return JSONResponse({"detail": detail, "message": message}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        state().metrics.error("internal")
        return JSONResponse({"detail": "internal error", "message": f"{type(exc).__name__}"}, status_code=500)

    def _stage_header(response: Response, st: ServeState, request: Request, timings: dict[str, float]) -> None:
        timings = {"parse": timings.pop("parse"), **timings}
        for k, v in timings.items():
            st.metrics.stage(k, v)
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in timings.items())

    async def read_body(request: Request, model):
        """The request body validated as ``model`` in one pass of pydantic-core (JSON bytes straight
        to the model, several times faster than parsing to Python objects and validating those);
        errors are answered as FastAPI's own body errors (422, ``loc`` starting with "body")."""
        try:
            raw = await request.body()
        except ClientDisconnect:  # the client is gone: a 4xx in the metrics, not an internal error
            raise HTTPException(400, "the client disconnected while sending the body") from None
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError([{"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
                                          for err in e.errors(include_url=False)]) from None

    def _json(model, st: ServeState, request: Request, timings: dict[str, float]) -> Response:
        """A response model serialised by pydantic-core (what ``response_model`` would do, minus its
        second validation of the model we just built)."""
        response = Response(model.model_dump_json(), media_type="application/json")
        _stage_header(response, st, request, timings)
        return response

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> Response:
        st = getattr(app.state, "serve", None)
        if st is None or st.current is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", **st.current.info})

    # The scoring routes read their body themselves (``read_body``; ``openapi_extra`` documents it)
    # on the event loop and score in the thread pool: scoring on the loop saves a thread switch
    # per request but serves concurrent clients unfairly (p99 at 32 clients several times worse).
    @app.post("/v1/score", response_model=ScoreResponse, tags=["score"], openapi_extra=_body_doc(ScoreRequest))
    async def score_one(request: Request, explain: bool = False,
                        top: int = Query(3, ge=1, le=20, description="reasons per user with explain=true"),
                        st: ServeState = Depends(require_key)):
        body = await read_body(request, ScoreRequest)
        timings = {"parse": time.perf_counter() - request.scope["pi.t0"]}
        loaded = st.current
        p, ats, n, active, ids, why = await run_in_threadpool(score_users, st, loaded, [body], "body", timings,
                                                              top if explain else 0)
        st.metrics.score(p)
        info = loaded.info
        out = ScoreResponse(probability=float(p[0]), model=info["model"], version=info["version"], run=info["run"],
                            at=ats[0].isoformat() + "Z", n_events=n[0], active=active[0],
                            user_id=ids[0] if body.user_id is not None else None, reasons=why[0] if why else None)
        return _json(out, st, request, timings)

    @app.post("/v1/score/batch", response_model=BatchResponse, tags=["score"], openapi_extra=_body_doc(BatchRequest))
    async def score_batch(request: Request, explain: bool = False,
                          top: int = Query(3, ge=1, le=20, description="reasons per user with explain=true"),
                          st: ServeState = Depends(require_key)):
        body = await read_body(request, BatchRequest)
        timings = {"parse": time.perf_counter() - request.scope["pi.t0"]}
        if len(body.users) > st.settings.max_users:
            raise ApiError(422, "body.users", f"at most {st.settings.max_users} users per batch, got {len(body.users)}")
        loaded = st.current
        p, ats, n, active, _, why = await run_in_threadpool(score_users, st, loaded, body.users, "body.users", timings,
                                                            top if explain else 0)
        st.metrics.score(p)
        info = loaded.info
        why = why or [None] * len(p)
        results = [BatchItem(user_id=u.user_id, probability=float(pi), at=a.isoformat() + "Z", n_events=k, active=ac,
                             reasons=r)
                   for u, pi, a, k, ac, r in zip(body.users, p, ats, n, active, why)]
        out = BatchResponse(model=info["model"], version=info["version"], run=info["run"], results=results)
        return _json(out, st, request, timings)

    @app.get("/v1/users/{user_id}/score", response_model=ScoreResponse, tags=["score"])
    def score_known(user_id: str, request: Request, response: Response, at: Optional[str] = None,
                    pseudonymised: bool = False, explain: bool = False,
                    top: int = Query(3, ge=1, le=20, description="reasons with explain=true"),
                    st: ServeState = Depends(require_key)):
        """Score a user from the workspace's events (``pseudonymised=true``: the id is already a pseudonym)."""
        from .schemas import MAX_ID_CHARS, parse_timestamp

        timings = {"parse": time.perf_counter() - request.scope["pi.t0"]}
        if len(user_id) > MAX_ID_CHARS:
            raise ApiError(422, "path.user_id", f"at most {MAX_ID_CHARS} characters")
        cutoff = None
        if at is not None:
            try:
                cutoff = parse_timestamp(float(at) if _is_number(at) else at)
            except ValueError as e:
                raise ApiError(422, "query.at", str(e)) from None
        loaded = st.current
        uid = user_id if pseudonymised else st.pseudonymise([user_id])[0]
        con = st.workspace_con()
        n_total, last = con.execute("SELECT count(*), max(ts) FROM events WHERE user_id = $u", {"u": uid}).fetchall()[0]
        if not n_total:
            raise ApiError(404, "path.user_id", "no events of this user in the workspace", kind="not_found")
        if cutoff is None:
            cutoff = con.execute("SELECT max(ts) FROM events").fetchall()[0][0] + ONE_US
        n, last_before = con.execute("SELECT count(*), max(ts) FROM events WHERE user_id = $u AND ts < $at",
                                     {"u": uid, "at": cutoff}).fetchall()[0]
        if not n:
            raise ApiError(422, "query.at", f"the user has no event before {cutoff.isoformat()}")
        p, why = predict(st, loaded, con, [uid], [cutoff], timings, top if explain else 0)
        st.metrics.score(p)
        _stage_header(response, st, request, timings)
        info = loaded.info
        return ScoreResponse(probability=float(p[0]), model=info["model"], version=info["version"], run=info["run"],
                             at=cutoff.isoformat() + "Z", n_events=int(n), active=last_before >= cutoff - loaded.lookback,
                             user_id=uid, reasons=why[0] if why else None)

    @app.get("/v1/model", response_model=ModelInfo, tags=["admin"])
    def model_info(st: ServeState = Depends(require_key)):
        return ModelInfo(**st.current.info)

    @app.post("/v1/admin/reload", response_model=ModelInfo, tags=["admin"])
    def reload(body: Optional[ReloadRequest] = None, st: ServeState = Depends(require_key)):
        """Swap in a run from the runs directory; requests in flight finish on the run they started with."""
        try:
            new, old_version = st.reload(body.run if body else None)
        except FileNotFoundError as e:
            raise ApiError(404, "body.run", str(e), kind="not_found") from None
        except ValueError as e:
            raise ApiError(422, "body.run", str(e)) from None
        return ModelInfo(**new.info, previous_version=old_version)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["admin"])
    def metrics(st: ServeState = Depends(require_key)):
        return PlainTextResponse(st.metrics.render(st.current.info if st.current else None),
                                 media_type="text/plain; version=0.0.4")

    _openapi_with_bodies(app, (ScoreRequest, BatchRequest))
    return app


def _body_doc(model) -> dict:
    """OpenAPI request body of a route that validates its body itself (see ``read_body``); the
    schema itself is added by ``_openapi_with_bodies``."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


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


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _reload_quietly(st: ServeState) -> None:
    try:
        st.reload(None)
    except Exception as e:  # a bad run on disk must not take the server down
        print(f"reload failed, still serving {st.current.info['version'] if st.current else None}: {e}", flush=True)


class _Observe:
    """ASGI middleware: request count and latency by route, and the body size limit (413)."""

    def __init__(self, app, settings: ServeSettings, app_ref):
        self.app, self.max_bytes, self.app_ref = app, settings.max_body_bytes, app_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

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
    import json

    body = json.dumps({"detail": [{"loc": ["body"], "msg": f"request body larger than {max_bytes} bytes"}],
                       "message": f"body: request body larger than {max_bytes} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# command line
def settings_from_args(a: argparse.Namespace) -> ServeSettings:
    return ServeSettings(workspace=a.workspace, run=a.run, runs_dir=a.runs_dir, host=a.host, port=a.port,
                         api_keys=read_api_keys(key_file=a.api_key_file), max_events=a.max_events,
                         max_users=a.max_users, max_body_bytes=a.max_body_bytes, log_level=a.log_level,
                         freeze_gc=True)


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    settings = settings_from_args(a)
    app = create_app(settings)
    print(f"serving run {settings.run!r} from {settings.runs_path.resolve()} on http://{settings.host}:{settings.port} "
          f"(docs: /docs; pid {os.getpid()}; `kill -HUP {os.getpid()}` reloads the run)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register `purchase-intent serve` on an argparse subparsers object."""
    d = ServeSettings()
    p = sub.add_parser("serve", help="real-time scoring API (FastAPI) for one run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run name under the runs directory (the only place runs are loaded from)")
    p.add_argument("--runs-dir", help="directory of runs (default: <workspace>/runs)")
    p.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--api-key-file", help=f"file with one API key per line (merged with ${API_KEYS_ENV}, comma-separated)")
    p.add_argument("--max-events", type=int, default=d.max_events, help="events per user in a request (422 above)")
    p.add_argument("--max-users", type=int, default=d.max_users, help="users per batch request (422 above)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size (413 above)")
    p.add_argument("--log-level", default=d.log_level, help="uvicorn log level (default warning)")
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m purchase_intent.serve.app [--workspace DIR] serve --run NAME` (same as the CLI)."""
    parser = argparse.ArgumentParser(prog="purchase-intent")
    parser.add_argument("--workspace", default=os.environ.get("PURCHASE_INTENT_WORKSPACE", "pi-workspace"))
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    a = parser.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    raise SystemExit(main())
