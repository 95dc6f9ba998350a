"""The HTTP side of ``pf-engine serve``: a FastAPI app with OpenAI's ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/models``, plus ``/health`` and Prometheus ``/metrics``.

Handlers check and tokenize a request, hand it to the engine loop (pf_engine.server.loop) and await
its events; a client that goes away cancels its request. Every error leaves in OpenAI's shape, and the
OpenAPI schema (/openapi.json) says so: each status an endpoint answers, each field's bounds.
"""

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from pf_engine.api import Engine
from pf_engine.core import PEAK_STATS
from pf_engine.errors import OutOfBlocksError
from pf_engine.search import Algorithm
from pf_engine.server import schema
from pf_engine.server.loop import QueueFull, ServerLoop, Ticket
from pf_engine.server.protocol import (
    ChatRequest,
    CompletionRequest,
    Job,
    Limits,
    RequestError,
    bounds,
    check_length,
    choices,
    chunk,
    error_body,
    parse,
    response,
    usage,
)
from pf_engine.server.schema import (
    ChatChunk,
    ChatCompletion,
    Completion,
    CompletionChunk,
    Health,
    ModelList,
)

MAX_ALGORITHMS = 256  # algorithm objects kept for reuse: requests of one config end their rounds together

class Metrics:
    def __init__(self, loop: ServerLoop):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pf_engine_requests", "HTTP requests answered (499: the client went away first; "
                                "path: the route, or other)", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("pf_engine_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("pf_engine_generated_tokens", "tokens drawn for finished requests, "
                                        "every particle's", registry=r)
        self.prm_tokens = Counter("pf_engine_prm_tokens", "tokens a model PRM read for finished requests",
                                  registry=r)
        self.latency = Histogram("pf_engine_request_latency_seconds", "from a request's arrival to its answer",
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        Gauge("pf_engine_kv_blocks_in_use", "KV blocks held (policy and PRM pools)",
              registry=r).set_function(lambda: loop.kv_blocks_in_use)
        Gauge("pf_engine_queue_length", "requests waiting for admission", registry=r).set_function(
            lambda: loop.num_waiting)
        Gauge("pf_engine_running_requests", "requests in the running batch", registry=r).set_function(
            lambda: loop.num_running)
        r.register(_EngineStats(loop.engine.core.stats))

    def finished(self, ticket: Ticket, result) -> None:
        self.prompt_tokens.inc(len(ticket.problem.prompt_ids))
        self.generated_tokens.inc(result.stats["tokens_generated"])
        self.prm_tokens.inc(result.stats["prm_tokens"])
        self.latency.observe(time.monotonic() - ticket.submitted)


class _AuthorizeAndCount:
    """Demands the API key (but on /health) and counts each answer by route and status. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, whose wrapped receive hides a client's going away from
    ``request.is_disconnected()``."""

    def __init__(self, app, api_key: str | None, counter: Counter, paths: set[str]):
        self.app, self.api_key, self.counter, self.paths = app, api_key, counter, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.paths else "other"  # a label per path seen would grow
        if self.api_key is not None and scope["path"] != "/health":
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                self.counter.labels(route, "401").inc()
                answer = JSONResponse(RequestError("a valid API key is needed: Authorization: Bearer KEY", None, 401,
                                                   "authentication_error").body(), status_code=401)
                return await answer(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


class _EngineStats:
    """The decode loop's forwards and the sequences they ran (sequences / forwards is the mean batch, which
    shows concurrent requests sharing forwards), and the KV pools' peaks. One scheduler serves every
    request and never resets them, so the peaks are the server's since start-up: a response's usage holds
    its request's own counts only."""

    def __init__(self, stats: dict):
        self.stats = stats

    def collect(self):
        yield CounterMetricFamily("pf_engine_decode_forwards", "policy forwards of the decode loop",
                                  value=self.stats["decode_forwards"])
        yield CounterMetricFamily("pf_engine_decode_sequences", "sequences those forwards ran, summed",
                                  value=self.stats["decode_sequences"])
        peaks = GaugeMetricFamily("pf_engine_kv_blocks_peak", "the most KV blocks held at once since the server "
                                  "started, by pool; unshared: what the particles would hold with no block shared",
                                  labels=["pool", "sharing"])
        for key in PEAK_STATS:
            peaks.add_metric(["prm" if "prm" in key else "policy", "unshared" if "unshared" in key else "shared"],
                             self.stats[key])
        yield peaks


def build_app(engine: Engine, limits: Limits, api_key: str | None = None, max_queue: int = 1024,
              max_running: int | None = None, progress_interval: float = 1.0) -> FastAPI:
    """The app serving ``engine``; its engine loop runs while the app does (lifespan)."""
    loop = ServerLoop(engine, max_queue, progress_interval, max_running)
    metrics = Metrics(loop)
    loop.on_finish = metrics.finished
    paths: set[str] = set()  # the routes, filled below: /metrics labels other paths "other"
    auth = (401,) if api_key is not None else ()

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="pf_engine", summary="particle-filtering inference-time scaling, OpenAI-compatible",
                  lifespan=lifespan)
    app.state.loop, app.state.metrics = loop, metrics
    app.add_middleware(_AuthorizeAndCount, api_key=api_key, counter=metrics.requests, paths=paths)
    _add_error_handlers(app)
    _add_info_routes(app, limits, metrics, auth)
    _add_search_routes(app, _Searches(engine, limits, loop, progress_interval), auth)
    _add_openapi(app, limits, keyed=api_key is not None)
    paths.update(route.path for route in app.routes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's error shape: the server's own, pydantic's (400, not FastAPI's 422) and
    Starlette's (404, 405)."""
    app.add_exception_handler(RequestError, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)


async def _refused(request: Request, exc: RequestError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error",
                                       None, "invalid_json"), status_code=400)
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg')}", "invalid_request_error", param,
                                   "invalid_value"), status_code=400)


async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, str(exc.status_code)),
                        status_code=exc.status_code, headers=exc.headers)  # a 405's Allow


def _add_info_routes(app: FastAPI, limits: Limits, metrics: Metrics, auth: tuple[int, ...]) -> None:
    """/health, /metrics and /v1/models. The handlers' names are the schema's operation ids."""

    @app.get("/health", responses={200: {"model": Health}})
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {
        "type": "string"}}}, "description": "Prometheus' text format"}} | schema.errors(*auth))
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses={200: {"model": ModelList}} | schema.errors(*auth))
    async def models():
        return {"object": "list", "data": [{"id": limits.model_name, "object": "model", "created": 0,
                                            "owned_by": "pf_engine", "max_model_len": limits.max_model_len}]}


def _add_search_routes(app: FastAPI, searches: "_Searches", auth: tuple[int, ...]) -> None:
    """/v1/chat/completions and /v1/completions. The handlers' names are the schema's operation ids."""
    refusals = schema.errors(400, *auth, 404, 429, 500)
    # read by parse(); declared here for the schema alone
    budget_header = {"parameters": [{"name": "X-ITS-Budget", "in": "header",
                                     "schema": bounds(searches.limits)["budget"],
                                     "description": "its_hub: the number of particles, as the body's budget"}]}

    @app.post("/v1/chat/completions", openapi_extra=budget_header,
              responses={200: {"model": ChatCompletion, "content": schema.event_stream(ChatChunk)}} | refusals)
    async def chat_completions(body: ChatRequest, request: Request):
        return await searches.answer(body, request)

    @app.post("/v1/completions", openapi_extra=budget_header,
              responses={200: {"model": Completion, "content": schema.event_stream(CompletionChunk)}} | refusals)
    async def completions(body: CompletionRequest, request: Request):
        return await searches.answer(body, request)


def _add_openapi(app: FastAPI, limits: Limits, keyed: bool) -> None:
    """/openapi.json: FastAPI's schema, post-processed once (pf_engine.server.schema.document)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema.document(FastAPI.openapi(app), limits, keyed)
        return app.openapi_schema

    app.openapi = openapi


class _Searches:
    """What the search endpoints do with a request: check it, hand it to the engine loop, and answer
    with the result (or stream its progress and steps); a client that goes away cancels it."""

    def __init__(self, engine: Engine, limits: Limits, loop: ServerLoop, progress_interval: float):
        self.engine, self.limits, self.loop, self.progress_interval = engine, limits, loop, progress_interval
        self.algorithms: dict = {}  # config (seed 0) -> Algorithm, at most MAX_ALGORITHMS

    def selection_policy(self, job: Job) -> Algorithm:
        """One policy object per config but its seed: requests of one search end their rounds together."""
        config = replace(job.config, seed=0)
        if config not in self.algorithms:
            if len(self.algorithms) >= MAX_ALGORITHMS:
                self.algorithms.clear()
            try:
                self.algorithms[config] = self.engine.algorithm(config)
            except ValueError as exc:
                raise RequestError(str(exc), "search.algorithm") from None
        return self.algorithms[config]

    async def answer(self, body, request: Request):
        job, ticket = self._submit(body, request)
        if job.stream:
            return StreamingResponse(self._events(job, ticket), media_type="text/event-stream")
        try:
            return await self._result(job, ticket, request)
        finally:
            if not ticket.done:
                self.loop.cancel(ticket)

    def _submit(self, body, request: Request) -> tuple[Job, Ticket]:
        """The checked request, queued on the engine loop."""
        job = parse(body, self.limits, request.headers.get("x-its-budget"))
        try:
            problem = self.engine.problem(job.item, 0, 0, self.selection_policy(job), seed=job.config.seed)
        except OutOfBlocksError as exc:
            raise RequestError(f"this request can never fit the server's KV cache: {exc}",
                               "budget" if body.budget is not None else "search.num_particles") from None
        except ValueError as exc:
            raise RequestError(str(exc), "messages" if job.chat else "prompt") from None
        check_length(job, len(problem.prompt_ids), self.limits)
        ticket = Ticket(problem, asyncio.Queue(), asyncio.get_running_loop())
        try:
            self.loop.submit(ticket)
        except QueueFull as exc:
            raise RequestError(f"the server is busy: {exc}; try again later", None, 429, "rate_limit_error") from None
        return job, ticket

    async def _result(self, job: Job, ticket: Ticket, request: Request) -> Response:
        """The whole answer once the search ends; 499 if the client goes away first."""
        while True:
            try:
                kind, payload = await asyncio.wait_for(ticket.events.get(), timeout=0.5)
            except TimeoutError:
                kind = "waiting"
            if kind == "error":
                raise RequestError(f"the engine failed on this request: {payload}", None, 500, "server_error")
            if kind == "result":
                return JSONResponse(response(job, payload, len(ticket.problem.prompt_ids), self.limits.model_name))
            if await request.is_disconnected():  # after progress too: it may come more often than 0.5 s
                return Response(status_code=499)  # answer()'s finally cancels it

    async def _events(self, job: Job, ticket: Ticket):
        """Server-sent events: progress while the search runs (at least every ``progress_interval``),
        then each returned particle's steps, its finish reason, usage if asked, and [DONE]."""
        model, progress = self.limits.model_name, {"state": "waiting", "step": 0, "sweep": 0, "live_particles": 0}
        try:
            for index in range(job.n):
                first = chunk(job, model, index, "")
                if job.chat:
                    first["choices"][0]["delta"]["role"] = "assistant"
                yield _sse(first)
            while True:
                try:
                    kind, payload = await asyncio.wait_for(ticket.events.get(), timeout=self.progress_interval)
                except TimeoutError:
                    kind, payload = "progress", progress
                if kind == "progress":
                    progress = payload
                    yield _sse(chunk(job, model, 0, "", pf_engine={"progress": payload}))
                    continue
                if kind == "error":
                    yield _sse(error_body(f"the engine failed on this request: {payload}", "server_error", None,
                                          "internal_error"))
                else:
                    for body in _result_chunks(job, ticket, payload, model):
                        yield _sse(body)
                break
            yield "data: [DONE]\n\n"
        finally:
            if not ticket.done:
                self.loop.cancel(ticket)


def _result_chunks(job: Job, ticket: Ticket, result, model: str):
    """The stream's chunks of a finished search: each returned particle's steps and finish reason,
    then usage and the tree where the request asks for them."""
    for index, particle in enumerate(choices(result, job.n)):
        for text in result.steps_of(particle):
            yield chunk(job, model, index, text)
        yield chunk(job, model, index, reason=result.finish_reasons[particle])
    if job.include_usage:
        yield chunk(job, model, usage=usage(job, result, len(ticket.problem.prompt_ids)))
    if job.return_tree:
        yield chunk(job, model, pf_engine={"tree": result.tree_records()})


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
