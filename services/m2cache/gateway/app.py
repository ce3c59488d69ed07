"""The gateway's ASGI application (Starlette): /v1/completions and
/v1/chat/completions (SSE streaming or not), /v1/models, /health (readiness:
workers and tiers), /live, /metrics. A thin layer: JSON in, validated, one
``AsyncClient`` call, JSON or SSE out.

Per request: API key (401), admission (429 past ``max_concurrent``), body read
under a size cap (413) and a deadline (408), validation (400), then the call. A
client that disconnects cancels its generation (the gRPC call is cancelled, and
the worker frees the sequence's slot)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from m2cache import security as sec
from m2cache.gateway import openai_api as api
from m2cache.gateway import validate
from m2cache.gateway.config import GatewayConfig
from m2cache.gateway.readiness import Readiness
from m2cache_client import AsyncClient, M2CacheClientError
from m2cache_client import errors as client_errors
from m2cache_client.client import Progress

log = logging.getLogger(__name__)

HTTP_STATUS = {
    client_errors.InvalidRequest: 400, client_errors.ModelNotFound: 404, client_errors.Overloaded: 429,
    client_errors.Unavailable: 503, client_errors.DeadlineExceeded: 504, client_errors.Cancelled: 499,
}
MAX_HEAD_BYTES = 16 << 10  # h11's own cap on a head still arriving
# Absolute paths in messages relayed from the servers are the server's business, not the client's.
_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.code, self.headers = code if code is not None else status, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(api.error_body(self.message, self.kind, self.code, self.param), self.status,
                            headers=self.headers)


def clean(message: str) -> str:
    return _PATH.sub("<path>", message)


class Gateway:
    """What the handlers share: config, the async worker client (made in the server's
    event loop at start-up), readiness probes, metrics, the admission count."""

    def __init__(self, config: GatewayConfig, security: sec.SecurityConfig | None = None):
        self.config = config
        self.security = security or sec.installed()
        self.api_keys = self.security.api_keys
        self.client: AsyncClient | None = None
        self.readiness: Readiness | None = None
        self.in_flight = 0
        r = self.registry = CollectorRegistry()
        self.requests = Counter("m2cache_gateway_requests", "HTTP requests", ["path", "status"], registry=r)
        self.latency = Histogram("m2cache_gateway_seconds", "request latency", ["path"], registry=r)
        self.tokens = Counter("m2cache_gateway_tokens", "completion tokens streamed", registry=r)
        self.refused = Counter("m2cache_gateway_auth_refused", "requests refused for a missing or wrong API key",
                               ["reason"], registry=r)
        self.overloaded = Counter("m2cache_gateway_overloaded", "requests refused with 429 at admission", registry=r)
        self.active = Gauge("m2cache_gateway_in_flight", "generations in flight", registry=r)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        s = self.security
        read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
        self.client = AsyncClient(self.config.worker_targets(), model=self.config.model, timeout_s=self.config.timeout_s,
                                  tls=bool(s.tls_ca), root_certificates=read(s.tls_ca),
                                  certificate_chain=read(s.tls_cert) if s.tls_ca else None,
                                  private_key=read(s.tls_key) if s.tls_ca else None, token=s.token,
                                  server_name=s.tls_server_name)
        self.readiness = Readiness(self.config, s)
        try:
            yield
        finally:
            await self.client.close()
            await self.readiness.close()

    # ---- per-request steps ---------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization")
        if sec.token_ok(header, self.api_keys):
            return
        reason = "missing" if not header else "invalid"
        self.refused.labels(reason).inc()
        raise HttpError(401, f"{reason} API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    def admit(self) -> None:
        if self.in_flight >= self.config.max_concurrent:
            self.overloaded.inc()
            raise HttpError(429, f"gateway busy: {self.in_flight} generations in flight; retry shortly",
                            kind="rate_limit_error", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.active.set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        self.active.set(self.in_flight)

    async def body(self, request: Request) -> dict:
        """The JSON body, read under the size cap and the body deadline."""
        cap = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            raise HttpError(413 if length.isdigit() else 400, f"request body over the {cap}-byte limit"
                            if length.isdigit() else "bad Content-Length")
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.body_timeout_s
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(end - loop.time(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise HttpError(408, f"request body not received within {self.config.body_timeout_s:g}s",
                                headers={"Connection": "close"}) from None
            size += len(chunk)
            if size > cap:
                raise HttpError(413, f"request body over the {cap}-byte limit", headers={"Connection": "close"})
            chunks.append(chunk)
        body = validate.parse_json(b"".join(chunks) or b"{}")
        model = body.get("model")
        if isinstance(model, str) and model and model != self.config.model:
            raise HttpError(404, f"model {model!r} is not served here; try {self.config.model!r}",
                            code="model_not_found", param="model")
        return body


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race(request: Request, work):
    """Await ``work`` unless the client disconnects first (then cancel it; None)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return None
    return task.result()


def build_app(gw: Gateway) -> Starlette:
    cfg = gw.config

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool) -> Response:
        gw.authorize(request)
        gw.admit()
        handed_off = False
        try:
            body = await gw.body(request)
            parse = validate.chat if chat else validate.completion
            parsed = parse(body, cfg.default_max_tokens, cfg.default_temperature, cfg.max_prompt_chars)
            rid = api.new_id("chatcmpl" if chat else "cmpl")
            if not parsed.stream:
                return await whole(request, parsed, rid, chat)
            response = await streamed(request, parsed, rid, chat)
            handed_off = isinstance(response, StreamingResponse)  # the stream releases the slot when it ends
            return response
        finally:
            if not handed_off:
                gw.release()

    async def whole(request: Request, parsed: validate.Parsed, rid: str, chat: bool) -> Response:
        done = await race(request, gw.client.generate(**parsed.kwargs))
        if done is None:
            return Response(status_code=499)  # nobody is listening
        gw.tokens.inc(len(done.token_ids))
        use = api.usage(len(done.prompt_token_ids), len(done.token_ids), done.stats)
        make = api.chat_body if chat else api.completion_body
        return JSONResponse(make(rid, cfg.model, done.text, done.finish_reason, use))

    async def streamed(request: Request, parsed: validate.Parsed, rid: str, chat: bool) -> Response:
        progress = Progress()
        tokens = gw.client.stream(progress_out=progress, **parsed.kwargs).__aiter__()
        try:  # errors before the first token still get a JSON status
            first = await race(request, anext(tokens, None))
        except BaseException:
            await tokens.aclose()
            raise
        if first is None and not progress.done:
            await tokens.aclose()
            return Response(status_code=499)
        return StreamingResponse(events(tokens, first, progress, parsed, rid, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(tokens, first, progress: Progress, parsed: validate.Parsed, rid: str, chat: bool):
        chunk = api.chat_chunk if chat else api.completion_chunk
        try:
            if chat:
                yield sse(api.chat_chunk(rid, cfg.model, None, None, first=True))
            token = first
            while token is not None:
                gw.tokens.inc(1 if token.id >= 0 else 0)
                if token.text:
                    yield sse(chunk(rid, cfg.model, token.text, None))
                token = await anext(tokens, None)
            stats = progress.stats
            yield sse(chunk(rid, cfg.model, None if chat else "", stats.finish_reason if stats else "stop"))
            if parsed.include_usage:
                use = api.usage(len(progress.prompt_ids), len(progress.token_ids), stats)
                yield sse(api.usage_chunk(rid, cfg.model, chat, use))
            yield b"data: [DONE]\n\n"
        except M2CacheClientError as err:  # the status line is gone: report in-band, as OpenAI does
            status, message = client_error(err)
            yield sse(api.error_body(message, err.code.name.lower(), status))
        finally:
            await tokens.aclose()
            gw.release()

    async def models(request: Request) -> Response:
        gw.authorize(request)
        return JSONResponse(api.models_body(cfg.model))

    async def health(request: Request) -> Response:
        ok, detail = await gw.readiness.check()
        return JSONResponse({"status": "ok" if ok else "unavailable", **detail}, 200 if ok else 503)

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gw.registry), media_type="text/plain; version=0.0.4")

    routes = [Route("/v1/completions", instrument(gw, completions), methods=["POST"]),
              Route("/v1/chat/completions", instrument(gw, chat_completions), methods=["POST"]),
              Route("/v1/models", instrument(gw, models), methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/live", live, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]

    async def http_exception(request: Request, exc: HTTPException) -> Response:
        message = "no route " + request.url.path if exc.status_code == 404 else exc.detail
        return HttpError(exc.status_code, clean(str(message))).response()

    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: http_exception})
    return HeaderCap(app)


class HeaderCap:
    """ASGI middleware: a request head over ``MAX_HEAD_BYTES`` gets 431. (h11 caps a
    head that arrives in pieces at the same size; one arriving whole it accepts.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEAD_BYTES:
            response = HttpError(431, f"request headers over {MAX_HEAD_BYTES} bytes", headers={"Connection": "close"})
            await response.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def instrument(gw: Gateway, endpoint):
    """Errors -> OpenAI error bodies with precise statuses; count and time every request."""

    async def handler(request: Request) -> Response:
        start = time.perf_counter()
        try:
            response = await endpoint(request)
        except HttpError as err:
            response = err.response()
        except validate.BadRequest as err:
            response = HttpError(400, clean(str(err)), param=err.param).response()
        except M2CacheClientError as err:
            status, message = client_error(err)
            response = HttpError(status, message, kind=err.code.name.lower()).response()
        except ClientDisconnect:
            response = Response(status_code=499)
        except Exception:  # never a traceback or a server path to the client
            log.exception("unhandled error serving %s", request.url.path)
            response = HttpError(500, "internal error (see the gateway's log)", kind="server_error").response()
        gw.requests.labels(request.url.path, str(response.status_code)).inc()
        gw.latency.labels(request.url.path).observe(time.perf_counter() - start)
        return response

    return handler


def client_error(err: M2CacheClientError) -> tuple[int, str]:
    if isinstance(err, client_errors.Unauthenticated):
        log.error("a worker refused the gateway's token: %s", err.details)
        return 502, "the gateway could not authenticate to its workers"
    status = HTTP_STATUS.get(type(err), 502)
    return status, clean(err.details) if status != 502 else f"worker error ({err.code.name})"


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"
