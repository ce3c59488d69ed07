"""OpenAI-compatible HTTP gateway in front of the workers: /v1/completions and
/v1/chat/completions (SSE streaming or not), /v1/models, /health, /metrics.
A thin layer: JSON in, m2cache_client call, JSON or SSE out."""
from __future__ import annotations

import itertools
import json
import logging
import signal
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from m2cache import grpc_util
from m2cache.errors import M2CacheError
from m2cache.gateway import openai_api as api
from m2cache.gateway.config import GatewayConfig
from m2cache_client import Client, M2CacheClientError
from m2cache_client.client import Progress
from m2cache_client import errors as client_errors

log = logging.getLogger(__name__)

HTTP_STATUS = {
    client_errors.InvalidRequest: 400, client_errors.ModelNotFound: 404, client_errors.Overloaded: 429,
    client_errors.Unavailable: 503, client_errors.DeadlineExceeded: 504, client_errors.Cancelled: 499,
}


class Gateway:
    """The state handlers share: config, one client, metrics."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.client = Client(config.worker_targets(), model=config.model, timeout_s=config.timeout_s)
        self.registry = CollectorRegistry()
        self.requests = Counter("m2cache_gateway_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram("m2cache_gateway_seconds", "request latency", ["path"], registry=self.registry)
        self.tokens = Counter("m2cache_gateway_tokens", "completion tokens streamed", registry=self.registry)

    def healthy(self) -> bool:
        return any(grpc_util.check_health(t, "m2cache.v1.Worker", 1.0) == "SERVING" for t in self.config.worker_targets())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    gateway: Gateway  # set on the subclass made by create_server

    def log_message(self, fmt, *args) -> None:  # route http.server's access log through logging
        log.debug("%s " + fmt, self.address_string(), *args)

    # ---- routing ------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/health":
            ok = self.gateway.healthy()
            self._json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        elif path == "/metrics":
            self._send(200, generate_latest(self.gateway.registry), "text/plain; version=0.0.4")
        elif path == "/v1/models":
            self._json(200, api.models_body(self.gateway.config.model))
        else:
            self._json(404, api.error_body(f"no route {path}", "invalid_request_error", 404))

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        if path not in routes:
            self._json(404, api.error_body(f"no route {path}", "invalid_request_error", 404))
            return
        start = time.perf_counter()
        status = 500
        try:
            status = routes[path](self._body())
        except (M2CacheError, ValueError) as err:
            status = 400
            self._json(400, api.error_body(str(err), "invalid_request_error", 400))
        except M2CacheClientError as err:
            status = HTTP_STATUS.get(type(err), 500)
            self._json(status, api.error_body(err.details, err.code.name.lower(), status))
        finally:
            self.gateway.requests.labels(path, str(status)).inc()
            self.gateway.latency.labels(path).observe(time.perf_counter() - start)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        model = body.get("model")
        if model and model != self.gateway.config.model:
            raise client_errors.ModelNotFound(client_errors.grpc.StatusCode.NOT_FOUND,
                                              f"model {model!r} is not served here; try {self.gateway.config.model!r}")
        return body

    # ---- endpoints -------------------------------------------------------------------
    def _completions(self, body: dict) -> int:
        return self._run(body, api.completion_prompt(body), "cmpl", api.completion_body, api.completion_chunk, chat=False)

    def _chat(self, body: dict) -> int:
        return self._run(body, api.chat_messages(body), "chatcmpl", api.chat_body, api.chat_chunk, chat=True)

    def _run(self, body: dict, source: dict, prefix: str, whole, chunk, chat: bool) -> int:
        kwargs = {**source, **api.sampling_kwargs(body, self.gateway.config.default_max_tokens)}
        rid, model = api.new_id(prefix), self.gateway.config.model
        if not body.get("stream"):
            done = self.gateway.client.generate(**kwargs)
            self.gateway.tokens.inc(len(done.token_ids))
            self._json(200, whole(rid, model, done.text, done.finish_reason, len(done.prompt_token_ids),
                                  len(done.token_ids)))
            return 200
        progress = Progress()
        tokens = self.gateway.client.stream(progress_out=progress, **kwargs)
        first = next(tokens, None)  # errors before the first token still get a JSON status
        self._start_sse()
        if chat:
            self._event(chunk(rid, model, None, None, first=True))
        try:
            for token in itertools.chain([first] if first else [], tokens):
                self.gateway.tokens.inc(1 if token.id >= 0 else 0)
                if token.text:
                    self._event(chunk(rid, model, token.text, None))
        except M2CacheClientError as err:  # the status line is gone: report in-band, as OpenAI does
            self._event(api.error_body(err.details, err.code.name.lower(), HTTP_STATUS.get(type(err), 500)))
        else:
            reason = progress.stats.finish_reason if progress.stats else "stop"
            self._event(chunk(rid, model, None if chat else "", reason))
            self._raw(b"data: [DONE]\n\n")
        self._raw(b"")  # the last chunk of a chunked body
        return 200

    # ---- output helpers --------------------------------------------------------------
    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_sse(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, body: dict) -> None:
        self._raw(b"data: " + json.dumps(body).encode() + b"\n\n")

    def _raw(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (an empty one ends the body)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def create_server(config: GatewayConfig) -> tuple[ThreadingHTTPServer, int, Gateway]:
    """(server, port, gateway); call ``server.serve_forever()`` in a thread."""
    gateway = Gateway(config)
    handler = type("GatewayHandler", (Handler,), {"gateway": gateway})
    host, port = config.address.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    return server, server.server_address[1], gateway


def serve(config: GatewayConfig) -> None:
    server, port, gateway = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    log.info("gateway on http://%s:%d for %s", config.address.rsplit(":", 1)[0], port, config.worker_targets())
    stop.wait()
    server.shutdown()
    gateway.client.close()
