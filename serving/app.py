"""FastAPI app: similar items, Vertex AI prediction contract, item writes, hot reload, metrics.

`create_app(release_uri, ...)` builds the app around a `visrec.online.service.RecommenderService`.
The release loads in a background thread (`visrec.online.workers.serve_release`, which then
tails the journal) so the port opens at once and `/healthz` answers 503 until it is ready
(what Vertex AI and Kubernetes probes expect).

Reads (`similar`, `predict`) run on the event loop: a search is a fraction of a
millisecond of ScaNN plus vectorised filtering, cheaper than a hop to the thread pool.
Writes embed an image with torch and reloads read a whole release, so those run in the
thread pool. Every error reaches the client as `{"error": message}` with no stack trace.

The hottest route, `GET /v1/items/{item_id}/similar`, is answered by an ASGI middleware
in front of FastAPI's routing (`ServingLayer`), without the routing, request object and
response classes: measured with bench/serve.py, that cut the server's CPU per request
by about a sixth. Everything else goes through FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import signal
import threading
from datetime import datetime, timezone
import time
from typing import Any, Awaitable, Callable, Literal
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from visrec.core.errors import UserError
from visrec.online.config import ServingConfig
from visrec.online.errors import BadItem, NoEncoder, UnknownItem
from visrec.online.experiments import Shown
from visrec.online.service import RecommenderService
from visrec.online.workers import WorkerSpec, header_timeout_seconds, serve_release

log = logging.getLogger(__name__)

DEFAULT_K = 10
ADMIN_TOKEN_HEADER = "x-visrec-token"
MIN_TOKEN_LENGTH = 16
# Query parameters whose values never reach the access log.
_SECRET_PARAM = re.compile(r"(?i)([?&][^=&]*(?:token|key|secret|password|auth)[^=&]*=)[^&]*")
MAX_INSTANCES = 1000
SIMILAR_ROUTE = "/v1/items/{item_id}/similar"
_SIMILAR_PREFIX, _SIMILAR_SUFFIX = SIMILAR_ROUTE.split("{item_id}")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SURVIVOR_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 150, 200, 500, 1000)


class ItemUpdate(BaseModel):
    """`PUT /v1/items/{item_id}` body; unknown fields are refused so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = None
    category: str | None = Field(default=None, min_length=1)
    price: StrictFloat | StrictInt | None = Field(default=None, ge=0)  # not `true`
    status: Literal["on_sale", "sold", "reserved"] | None = None
    image: str | None = Field(default=None, description="the image file, base64")
    image_uri: str | None = Field(default=None, description="gs:// URI or a path under the image root")


class PredictInstance(BaseModel):
    item_id: str
    k: StrictInt = DEFAULT_K  # `true` is not a number of neighbours


class PredictParameters(BaseModel):
    """Who is asking (the Vertex AI contract's `parameters`): the experiment arm and the impression log's keys."""

    user_id: str | None = Field(default=None, min_length=1)
    session_id: str | None = Field(default=None, min_length=1)


class PredictRequest(BaseModel):
    # Bounded so one request cannot hold the event loop for long (each instance is one search).
    instances: list[PredictInstance] = Field(max_length=MAX_INSTANCES)
    parameters: PredictParameters = Field(default_factory=PredictParameters)


class UserEvent(BaseModel):
    """`POST /v1/events`: what a user did with an answer (`request_id`) and one of its items."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    item_id: str = Field(min_length=1)
    type: Literal["tap", "purchase"]
    ts: datetime | None = Field(default=None, description="when; default: when the service received it")
    user_id: str | None = None


class UserEvents(BaseModel):
    events: list[UserEvent] = Field(min_length=1, max_length=MAX_INSTANCES)


class ServingMetrics:
    """Prometheus metrics on a registry of their own (several apps may share a process in tests)."""

    def __init__(self, service: RecommenderService):
        self.registry = CollectorRegistry()
        self.requests = Counter("visrec_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("visrec_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.survivors = Histogram("visrec_candidates_surviving",
                                   "ANN candidates left after the availability and price filters",
                                   buckets=SURVIVOR_BUCKETS, registry=self.registry)
        self.widened = Counter("visrec_search_widened", "Queries that needed the one wider fetch",
                               registry=self.registry)
        self.release = Gauge("visrec_release_info", "The release being served (value 1)", ["version"],
                             registry=self.registry)
        index_items = Gauge("visrec_index_items", "Vectors in the ANN index", registry=self.registry)
        index_items.set_function(lambda: len(service.state.index) if service.ready else 0)
        catalog_items = Gauge("visrec_catalog_items", "Items in the catalog", registry=self.registry)
        catalog_items.set_function(lambda: len(service.state.catalog) if service.ready else 0)
        skipped = Gauge("visrec_journal_entries_skipped", "Journal entries that could not be applied (logged)",
                        registry=self.registry)
        skipped.set_function(lambda: service.state.entries_skipped() if service.ready else 0)
        degraded = Gauge("visrec_degraded", "1 while an earlier release serves because CURRENT does not verify",
                         registry=self.registry)
        degraded.set_function(lambda: float(service.ready and service.state.degraded is not None))
        # The hand-over from the predecessor (docs/serving.md): what it carried, and what still
        # waits for re-embedding (new listings not yet recommendable); 0 without a predecessor.
        # The impression and event logs (`visrec.online.eventlog`): a slow sink drops rather than waits.
        for name, doc in (("written_rows", "Log rows written"), ("dropped_rows", "Log rows dropped (sink slow or down)"),
                          ("failed_batches", "Log batch writes that failed")):
            gauge = Gauge(f"visrec_log_{name}", doc, ["stream"], registry=self.registry)
            for stream in service.log.sinks:
                gauge.labels(stream=stream).set_function(
                    functools.partial(lambda s, n: service.log.counters()[s][n], stream, name))
        for name, doc in (("carried", "Writes carried from the predecessor release"),
                          ("embedded", "Predecessor upserts re-embedded with this release's encoder"),
                          ("failed", "Predecessor upserts that could not be re-embedded"),
                          ("pending", "Predecessor upserts waiting to be re-embedded")):
            gauge = Gauge(f"visrec_handover_{name}", doc, registry=self.registry)
            gauge.set_function(functools.partial(_handover_figure, service, name))

    def serving(self, version: str) -> None:
        self.release.clear()
        self.release.labels(version=version).set(1)


def _handover_figure(service: RecommenderService, name: str) -> float:
    handover = service.state.handover if service.ready else None
    if handover is None:
        return 0.0
    status = handover.status
    return float(status.to_embed - status.embedded - status.failed if name == "pending" else getattr(status, name))


def similar_route_item(scope: dict) -> str | None:
    """The item id of a request to `/v1/items/{item_id}/similar`, else None.

    Matches what the route template would: one non-empty path segment (the ASGI server
    has already percent-decoded it).
    """
    path = scope["path"]
    if not (path.startswith(_SIMILAR_PREFIX) and path.endswith(_SIMILAR_SUFFIX)):
        return None
    item_id = path[len(_SIMILAR_PREFIX):-len(_SIMILAR_SUFFIX)]
    return item_id if item_id and "/" not in item_id else None


async def send_json(send: Callable[[dict], Awaitable[None]], status: int, payload: dict,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ServingLayer:
    """Pure-ASGI middleware in front of FastAPI's routing: the similar-items fast path,
    metrics for every request (count and latency per route template) and the body size
    limit (413)."""

    def __init__(self, app: Any, metrics: ServingMetrics, max_body_bytes: int,
                 similar: Callable[[str, str | None, str | None, str | None], tuple[int, dict]]):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.similar = similar

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        label = "unmatched"

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            item_id = similar_route_item(scope)
            if item_id is not None:
                label = SIMILAR_ROUTE
                # POST too: Vertex AI's invoke API forwards only POSTs (docs/google-cloud.md).
                if scope["method"] not in ("GET", "POST"):
                    await send_json(send_status, 405, {"error": "Method Not Allowed"}, [(b"allow", b"GET, POST")])
                    return
                query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
                await send_json(send_status, *self.similar(item_id, query.get("k"), query.get("user_id"),
                                                           query.get("session_id")))
                return
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await send_json(send_status, 413, {"error": f"payload over {self.max_body_bytes} bytes"})
            else:
                await self.app(scope, receive, send_status)
        except Exception as exc:  # noqa: BLE001 - the fast path has no framework to catch for it
            if label != SIMILAR_ROUTE:
                raise
            log.error("unhandled error on GET %s", scope["path"], exc_info=exc)
            await send_json(send_status, 500, {"error": "internal error"})
        finally:
            if label != SIMILAR_ROUTE:
                route = scope.get("route")  # set by FastAPI's router when a route matched
                label = route.path if route is not None else label
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)


class RedactSecrets(logging.Filter):
    """Blanks the values of secret-looking query parameters (`?token=...`) in access-log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], _SECRET_PARAM.sub(r"\1REDACTED", record.args[2]), *record.args[3:])
        return True


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request headers have not all arrived
    `header_timeout` seconds after it opened (or after the previous response): idle and
    slow-header connections cannot pile up. uvicorn's keep-alive timeout covers the time
    between requests only once one was answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout_seconds()
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        if not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request headers in %.0f s",
                             self.header_timeout)
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _not_durable(exc: OSError) -> HTTPException:
    """A write the journal could not make durable (disk full, a file-size limit): 507, and the
    journal holds nothing of it (`visrec.online.journal`), so the client may simply retry."""
    log.error("a write could not be journaled: %s", exc)
    return HTTPException(507, f"the write was not stored (the journal cannot be written: {exc.strerror or exc})")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def parse_k(raw: str | None, max_k: int) -> int:
    """The `k` query parameter; `ValueError` with a client-facing message if it is not 1..max_k."""
    if raw is None:
        return DEFAULT_K
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"k must be an integer in 1..{max_k}, got {raw!r}") from None
    if not 1 <= k <= max_k:
        raise ValueError(f"k must be in 1..{max_k}, got {k}")
    return k


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


async def _read_json_model(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    """The body parsed into `model`: 413 over the size limit, 400 not JSON, 422 wrong shape."""
    body = bytearray()
    async for chunk in request.stream():  # also bounds bodies sent without Content-Length
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, f"payload over {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(400, "malformed JSON: nested too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(422, _validation_message(exc)) from None


def _stop_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down gracefully


def configured_admin_token() -> str | None:
    """`VISREC_ADMIN_TOKEN`, or the token stored at `VISREC_ADMIN_TOKEN_URI` (local or gs://);
    None when neither is set (writes disabled). A token shorter than `MIN_TOKEN_LENGTH`
    (blank, a placeholder) is refused at start-up rather than guarding the writes."""
    token = os.environ.get("VISREC_ADMIN_TOKEN") or None
    uri = os.environ.get("VISREC_ADMIN_TOKEN_URI")
    if token is None and uri:
        from visrec.core import io

        try:
            token = io.read_text(uri).strip()
        except FileNotFoundError:
            raise UserError(f"VISREC_ADMIN_TOKEN_URI names {uri}, which does not exist") from None
    if token is not None and len(token.strip()) < MIN_TOKEN_LENGTH:
        raise UserError(f"the admin token must be at least {MIN_TOKEN_LENGTH} characters "
                        "(unset VISREC_ADMIN_TOKEN to disable writes)")
    return token


def create_app(release_uri: str, config: ServingConfig | None = None, *, admin_token: str | None = None,
               events_token: str | None = None, health_route: str | None = None, predict_route: str | None = None,
               on_load_error: Callable[[], None] = _stop_process) -> FastAPI:
    """The similar-items app serving the release at `release_uri` (release dir or registry, local or gs://).

    admin_token: bearer token for write endpoints; default `VISREC_ADMIN_TOKEN`, else the content
        of the file or `gs://` object `VISREC_ADMIN_TOKEN_URI` names (how a Vertex AI deployment
        gets it without the token showing in the model's settings); neither -> writes 403.
    events_token: bearer token `POST /v1/events` accepts besides the admin token; default
        `VISREC_EVENTS_TOKEN`.
    health_route, predict_route: extra paths for the Vertex AI contract; default
        `AIP_HEALTH_ROUTE` / `AIP_PREDICT_ROUTE`.
    on_load_error: called when the release cannot be loaded (`app.state.load_error` says why);
        default: SIGTERM to this process, so uvicorn stops and the orchestrator sees it.
    """
    config = config or ServingConfig()
    admin_token = admin_token if admin_token is not None else configured_admin_token()
    # Clients (the marketplace's app backend) report taps with a token of their own, not the admin one.
    events_token = events_token if events_token is not None else os.environ.get("VISREC_EVENTS_TOKEN") or None
    health_route = health_route or os.environ.get("AIP_HEALTH_ROUTE")
    predict_route = predict_route or os.environ.get("AIP_PREDICT_ROUTE")
    service = RecommenderService(release_uri, config)
    metrics = ServingMetrics(service)
    stop = threading.Event()
    max_k = config.ranking.max_k

    def load_failed(exc: Exception) -> None:
        app.state.load_error = str(exc)
        on_load_error()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        access = logging.getLogger("uvicorn.access")  # configured by uvicorn by now
        if not any(isinstance(f, RedactSecrets) for f in access.filters):
            access.addFilter(RedactSecrets())
        serve_release(service, stop, on_release=metrics.serving, on_load_error=load_failed)
        yield
        stop.set()
        service.log.close()  # what is buffered is written before the process ends
        service.experiments.close()

    app = FastAPI(title="visrec similar items", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.load_error = None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error")

    def require_ready() -> None:
        if not service.ready:
            raise HTTPException(503, "release is still loading")

    def require_token(request: Request, accepted: list[str], what: str) -> None:
        if not accepted:
            raise HTTPException(403, f"{what} are disabled: no token configured")
        # Through a Vertex AI endpoint `Authorization` carries the caller's Google token, so the
        # token may come in `X-Visrec-Token` instead.
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if request.headers.get(ADMIN_TOKEN_HEADER) is not None:
            scheme, token = "bearer", request.headers[ADMIN_TOKEN_HEADER]
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), t.encode()) for t in accepted):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def require_admin(request: Request) -> None:
        require_token(request, [admin_token] if admin_token else [], "write endpoints (VISREC_ADMIN_TOKEN)")

    def similar_answer(item_id: str, shown: Shown) -> dict:
        ranked = shown.ranked
        metrics.survivors.observe(ranked.survivors)
        if ranked.widened:
            metrics.widened.inc()
        # request_id: what a client sends back with a tap (`POST /v1/events`).
        return {"item_id": item_id, "release": shown.release, "request_id": shown.request_id, "arm": shown.arm,
                "experiment": shown.experiment, "items": [{"item_id": r.item_id, "score": r.score, "price": r.price, "category": r.category}
                          for r in ranked.items]}

    async def health() -> JSONResponse:
        if not service.ready:
            return _error(503, app.state.load_error or "release is still loading")
        state = service.state
        return JSONResponse({"status": "ok", "release": state.release.version, "encoder": state.encoder_status(),
                             "degraded": state.degraded.as_dict() if state.degraded else None,
                             "journal_entries_skipped": state.entries_skipped(),
                             "handover": state.handover.status.as_dict() if state.handover else None,
                             "handover_from_successor": state.successor_handover.status.as_dict()
                             if state.successor_handover else None,
                             "experiment": service.experiments.status()})

    # GET for probes and people; POST as well wherever Vertex AI's invoke API must reach a route.
    for path in dict.fromkeys(["/healthz", "/readyz", health_route or "/healthz"]):
        app.add_api_route(path, health, methods=["GET", "POST"], include_in_schema=False)

    def similar(item_id: str, raw_k: str | None, user_id: str | None = None,
                session_id: str | None = None) -> tuple[int, dict]:
        """(status, body) of `GET /v1/items/{item_id}/similar?k=&user_id=&session_id=` (served by `ServingLayer`)."""
        if not service.ready:
            return 503, {"error": "release is still loading"}
        try:
            k = parse_k(raw_k, max_k)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        try:
            return 200, similar_answer(item_id, service.answer(item_id, k, user_id or None, session_id or None))
        except UnknownItem:
            return 404, {"error": f"unknown item {item_id!r}"}

    predicts_in_flight = 0

    async def predict(request: Request) -> JSONResponse:
        """The Vertex AI prediction contract. Bounded so a few clients cannot starve the replica:
        at most `max_predict_neighbours` (sum of k) per request, at most
        `max_concurrent_predicts` at once (429 beyond), and the searches run off the event loop,
        so health probes keep answering."""
        nonlocal predicts_in_flight
        require_ready()
        body = await _read_json_model(request, PredictRequest, config.max_body_bytes)
        asked = sum(instance.k for instance in body.instances)
        if asked > config.max_predict_neighbours:
            raise HTTPException(422, f"the instances ask for {asked} neighbours in all; at most "
                                     f"{config.max_predict_neighbours} per request")
        if predicts_in_flight >= config.max_concurrent_predicts:
            raise HTTPException(429, f"{predicts_in_flight} predictions are running; retry shortly",
                                headers={"Retry-After": "1"})
        predicts_in_flight += 1
        try:
            results = await run_in_threadpool(service.similar_many, [(i.item_id, i.k) for i in body.instances],
                                              body.parameters.user_id, body.parameters.session_id)
        finally:
            predicts_in_flight -= 1
        predictions = []
        for instance, result in zip(body.instances, results):
            if not 1 <= instance.k <= max_k:
                predictions.append({"item_id": instance.item_id, "error": f"k must be in 1..{max_k}"})
            elif isinstance(result, UnknownItem):
                predictions.append({"item_id": instance.item_id, "error": "unknown item"})
            else:
                # Who asked, echoed: Vertex AI's request-response log keeps the predictions, not the
                # parameters, and `visrec join-events --impressions-from` reads them back from it.
                predictions.append({**similar_answer(instance.item_id, result),
                                    **body.parameters.model_dump(exclude_none=True)})
        return JSONResponse({"predictions": predictions})

    for path in dict.fromkeys(["/predict", predict_route or "/predict"]):
        app.add_api_route(path, predict, methods=["POST"])

    @app.api_route("/v1/items/{item_id}", methods=["PUT", "POST"])
    async def put_item(item_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        require_ready()
        update = await _read_json_model(request, ItemUpdate, config.max_body_bytes)
        if update.image is not None and update.image_uri is not None:
            raise HTTPException(422, "give either `image` or `image_uri`, not both")
        try:
            result = await run_in_threadpool(service.upsert, item_id, update.model_dump(exclude_none=True))
        except BadItem as exc:
            raise HTTPException(422, str(exc)) from None
        except NoEncoder as exc:
            raise HTTPException(503, str(exc)) from None
        except OSError as exc:
            raise _not_durable(exc) from None
        return JSONResponse(result)

    @app.delete("/v1/items/{item_id}")
    @app.post("/v1/items/{item_id}/delete")
    async def delete_item(item_id: str, request: Request) -> JSONResponse:
        require_admin(request)
        require_ready()
        try:
            await run_in_threadpool(service.delete, item_id)
        except UnknownItem:
            raise HTTPException(404, f"unknown item {item_id!r}") from None
        except OSError as exc:
            raise _not_durable(exc) from None
        return JSONResponse({"item_id": item_id, "deleted": True})

    @app.api_route("/v1/items/{item_id}", methods=["GET"])
    async def get_item(item_id: str) -> JSONResponse:
        """What this replica serves for one item: its metadata and whether it is recommendable."""
        require_ready()
        try:
            return JSONResponse(service.item(item_id))
        except UnknownItem:
            raise HTTPException(404, f"unknown item {item_id!r}") from None

    @app.post("/admin/reload")
    async def reload(request: Request) -> JSONResponse:
        require_admin(request)
        require_ready()
        previous = service.state.release.version
        try:
            version = await run_in_threadpool(service.reload)
        except Exception as exc:  # noqa: BLE001 - any failure means: refuse, keep serving the old one
            log.error("reload refused, still serving %s: %s", previous, exc, exc_info=True)
            raise HTTPException(409, f"release refused, still serving {previous}: {exc}") from None
        metrics.serving(version)
        return JSONResponse({"release": version, "previous": previous})

    @app.post("/v1/events", status_code=202)
    async def events(request: Request) -> JSONResponse:
        """Taps and purchases on answers (one event, or `{"events": [...]}`), into the event log;
        `visrec join-events` fills the impressions' `tapped` from them. Accepted (202) as soon as
        they are buffered: logging never holds a client."""
        require_token(request, [t for t in (events_token, admin_token) if t],
                      "events (VISREC_EVENTS_TOKEN or VISREC_ADMIN_TOKEN)")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise HTTPException(413, f"payload over {config.max_body_bytes} bytes")
        try:
            parsed = json.loads(raw or b"null")
            batch = (UserEvents.model_validate(parsed).events if isinstance(parsed, dict) and "events" in parsed
                     else [UserEvent.model_validate(parsed)])
        except ValueError as exc:
            raise HTTPException(422, _validation_message(exc) if isinstance(exc, ValidationError)
                                else f"not JSON: {exc}") from None
        if not service.log.enabled:
            raise HTTPException(503, "event logging is off: start visrec serve with --log-uri")
        received = datetime.now(timezone.utc)
        for event in batch:
            stamp = (event.ts or received).astimezone(timezone.utc)
            service.record_event({"request_id": event.request_id, "item_id": event.item_id, "type": event.type,
                                  "ts": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "user_id": event.user_id})
        return JSONResponse({"accepted": len(batch)}, status_code=202)

    @app.api_route("/metrics", methods=["GET", "POST"])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The last middleware added runs first: ahead of FastAPI's routing and exception handling.
    app.add_middleware(ServingLayer, metrics=metrics, max_body_bytes=config.max_body_bytes, similar=similar)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` worker processes: `create_app` with the `WorkerSpec` that
    `visrec serve` put in the environment."""
    spec = WorkerSpec.from_env()
    return create_app(spec.release_uri, spec.config)
