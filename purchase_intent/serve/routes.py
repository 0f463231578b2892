"""The API's routes, on one ``APIRouter``: scoring, the known-user score, the model, reload, metrics, health.

Each route reads the shared :class:`ServeState` from ``request.app.state.serve`` (set in the app's
``lifespan``) and scores with the run it finds there when the request starts, so a hot swap never
changes the run under a request in flight. A run marked stale by `forget` (it learned from data
erased since) still serves, and says so: ``/readyz`` "stale" and the ``X-Run-Stale`` header of every
score response give the reason until the run is trained again.
"""
# no `from __future__ import annotations`: FastAPI reads the route annotations at definition.

import time
from typing import Optional

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..models.onnx_inference import fallback_counts as onnx_fallbacks
from ..privacy import earlier_pseudonyms
from ..times import ONE_US
from .schemas import (
    MAX_ID_CHARS,
    BatchItem,
    BatchRequest,
    BatchResponse,
    ModelInfo,
    ReloadRequest,
    ScoreRequest,
    ScoreResponse,
    parse_timestamp,
)
from .scoring import ApiError, ServeState, predict, score_users

router = APIRouter()
STALE_HEADER = "X-Run-Stale"


def body_doc(model) -> dict:
    """OpenAPI request body of a route that validates its body itself (see ``read_body``); the
    schema itself is added by the app (``serve.app``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve


async def require_key(request: Request) -> ServeState:  # async: no thread hop for a hash compare
    st = serve_state(request)
    if not st.authorised(request.headers.get("authorization")):
        st.metrics.error("auth")
        raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
    return st


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
        errors = e.errors(include_url=False)
        if any(err["type"] == "json_invalid" for err in errors) and not _is_utf8(raw):
            errors = [{"loc": (), "msg": "the body is not UTF-8: send the JSON encoded as UTF-8",
                       "type": "json_invalid"}]
        raise RequestValidationError([{"loc": ("body", *err["loc"]), "msg": err["msg"], "type": err["type"]}
                                      for err in errors]) from None


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stage_header(response: Response, st: ServeState, timings: dict[str, float]) -> None:
    timings = {"parse": timings.pop("parse"), **timings}
    for k, v in timings.items():
        st.metrics.stage(k, v)
    response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in timings.items())
    stale = st.current.stale if st.current is not None else None
    if stale:  # the run learned from data erased since (`forget`): retrain it
        response.headers[STALE_HEADER] = stale


def _json(model, st: ServeState, timings: dict[str, float]) -> Response:
    """A response model serialised by pydantic-core (what ``response_model`` would do, minus its
    second validation of the model we just built)."""
    response = Response(model.model_dump_json(), media_type="application/json")
    _stage_header(response, st, timings)
    return response


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@router.get("/healthz", tags=["health"])
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readyz(request: Request) -> Response:
    st = getattr(request.app.state, "serve", None)
    if st is None or st.current is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    # still ready after a failed reload (the previous run serves); "reload" says what failed and when
    # "stale": why the run must be retrained (it learned from data erased since), else null
    return JSONResponse({"status": "ready", **st.current.info, "reload": st.reload_status(),
                         "stale": st.current.stale})


# The scoring routes read their body themselves (``read_body``; ``openapi_extra`` documents it)
# on the event loop and score in the thread pool: scoring on the loop saves a thread switch
# per request but serves concurrent clients unfairly (p99 at 32 clients several times worse).
@router.post("/v1/score", response_model=ScoreResponse, tags=["score"], openapi_extra=body_doc(ScoreRequest))
async def score_one(request: Request, explain: bool = False,
                    top: int = Query(3, ge=1, le=20, description="reasons per user with explain=true"),
                    st: ServeState = Depends(require_key)):
    body = await read_body(request, ScoreRequest)
    timings = {"parse": time.perf_counter() - request.scope["pi.t0"]}
    loaded = st.current
    s = await run_in_threadpool(score_users, st, loaded, [body], "body", timings, top if explain else 0)
    st.metrics.score(s.probabilities)
    info = loaded.info
    out = ScoreResponse(probability=float(s.probabilities[0]), model=info["model"], version=info["version"],
                        run=info["run"], at=s.cutoffs[0].isoformat() + "Z", n_events=s.n_events[0],
                        active=s.active[0], user_id=s.user_ids[0] if body.user_id is not None else None,
                        reasons=s.reasons[0] if s.reasons else None)
    return _json(out, st, timings)


@router.post("/v1/score/batch", response_model=BatchResponse, tags=["score"], openapi_extra=body_doc(BatchRequest))
async def score_batch(request: Request, explain: bool = False,
                      top: int = Query(3, ge=1, le=20, description="reasons per user with explain=true"),
                      st: ServeState = Depends(require_key)):
    body = await read_body(request, BatchRequest)
    timings = {"parse": time.perf_counter() - request.scope["pi.t0"]}
    if len(body.users) > st.settings.max_users:
        raise ApiError(422, "body.users", f"at most {st.settings.max_users} users per batch, got {len(body.users)}")
    loaded = st.current
    s = await run_in_threadpool(score_users, st, loaded, body.users, "body.users", timings, top if explain else 0)
    st.metrics.score(s.probabilities)
    info = loaded.info
    why = s.reasons or [None] * len(s.probabilities)
    results = [BatchItem(user_id=u.user_id, probability=float(p), at=a.isoformat() + "Z", n_events=k, active=ac,
                         reasons=r)
               for u, p, a, k, ac, r in zip(body.users, s.probabilities, s.cutoffs, s.n_events, s.active, why)]
    out = BatchResponse(model=info["model"], version=info["version"], run=info["run"], results=results)
    return _json(out, st, timings)


@router.get("/v1/users/{user_id}/score", response_model=ScoreResponse, tags=["score"])
def score_known(user_id: str, request: Request, response: Response, at: Optional[str] = None,
                pseudonymised: bool = False, explain: bool = False,
                top: int = Query(3, ge=1, le=20, description="reasons with explain=true"),
                st: ServeState = Depends(require_key)):
    """Score a user from the workspace's events: ``user_id`` is the raw id or the stored pseudonym
    (``pseudonymised=true``: only the pseudonym)."""
    timings = {"parse": time.perf_counter() - request.scope["pi.t0"]}
    if len(user_id) > MAX_ID_CHARS:
        raise ApiError(422, "path.user_id", f"at most {MAX_ID_CHARS} characters")
    cutoff = None
    if at is not None:
        try:
            cutoff = parse_timestamp(float(at) if _is_number(at) else at)
        except ValueError as e:
            hint = " (a + in a URL reads as a space: write the offset's + as %2B)" if " " in at else ""
            raise ApiError(422, "query.at", f"{e}{hint}") from None
    loaded = st.current
    uid = user_id if pseudonymised else st.pseudonymise([user_id])[0]
    con = st.workspace_con()
    count = "SELECT count(*) FROM events WHERE user_id = $u"
    n_total = con.execute(count, {"u": uid}).fetchall()[0][0]
    if not n_total and not pseudonymised and con.execute(count, {"u": user_id}).fetchall()[0][0]:
        uid, n_total = user_id, 1  # the stored pseudonym itself (as `explain --user` takes either)
    for earlier in ([] if n_total or pseudonymised else earlier_pseudonyms(user_id, st.key)):
        if con.execute(count, {"u": earlier}).fetchall()[0][0]:  # as a file read by an earlier reader stored it
            uid, n_total = earlier, 1
            break
    if not n_total:
        raise ApiError(404, "path.user_id", "no events of this user in the workspace", kind="not_found")
    if cutoff is None:
        cutoff = con.execute("SELECT max(ts) FROM events").fetchall()[0][0] + ONE_US
    n, last_before = con.execute("SELECT count(*), max(ts) FROM events WHERE user_id = $u AND ts < $at",
                                 {"u": uid, "at": cutoff}).fetchall()[0]
    if not n:
        raise ApiError(422, "query.at", f"the user has no event before {cutoff.isoformat()}")
    out = predict(loaded, con, [uid], [cutoff], timings, top if explain else 0)
    st.metrics.score(out.probabilities)
    _stage_header(response, st, timings)
    info = loaded.info
    return ScoreResponse(probability=float(out.probabilities[0]), model=info["model"], version=info["version"],
                         run=info["run"], at=cutoff.isoformat() + "Z", n_events=int(n),
                         active=last_before >= cutoff - loaded.lookback, user_id=uid,
                         reasons=out.reasons[0] if out.reasons else None)


@router.get("/v1/model", response_model=ModelInfo, tags=["admin"])
def model_info(st: ServeState = Depends(require_key)):
    return ModelInfo(**st.current.info)


@router.post("/v1/admin/reload", response_model=ModelInfo, tags=["admin"])
def reload(body: Optional[ReloadRequest] = None, st: ServeState = Depends(require_key)):
    """Swap in a run from the runs directory; requests in flight finish on the run they started with."""
    try:
        new, old_version = st.reload(body.run if body else None)
    except FileNotFoundError as e:
        raise ApiError(404, "body.run", str(e), kind="not_found") from None
    except ValueError as e:
        raise ApiError(422, "body.run", str(e)) from None
    return ModelInfo(**new.info, previous_version=old_version)


@router.get("/metrics", response_class=PlainTextResponse, tags=["admin"])
def metrics(st: ServeState = Depends(require_key)):
    text = st.metrics.render(st.current.info if st.current else None, onnx_fallbacks(), st.drift_report())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
