"""A gateway over a real worker, DramTier, Redis and store on loopback, for the
HTTP tests (bad input, limits, disconnects, auth); every part stopped at the end."""
from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass, field

from m2cache.gateway import server as gateway_server
from m2cache.gateway.config import GatewayConfig
from m2cache.security import SecurityConfig
from tiers import DramHandle, start_redis
from worker_stack import WorkerHandle

MODEL = "tinystories-656k"


@dataclass
class GatewayStack:
    store_target: str
    gateway_overrides: dict = field(default_factory=dict)
    security: SecurityConfig | None = None
    worker_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        self.redis = start_redis()
        self.dram = DramHandle(self.store_target, self.redis.url, budget_bytes=1 << 20)
        self.worker = WorkerHandle(self.dram.target, MODEL, **self.worker_overrides)
        config = GatewayConfig(workers=self.worker.target, model=MODEL, address="127.0.0.1:0", timeout_s=60,
                               tiers=f"dram={self.dram.target}", **self.gateway_overrides)
        self.server = gateway_server.create_server(config, self.security or SecurityConfig()).start()
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()
        self.worker.stop()
        self.dram.stop()
        self.redis.stop()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send raw bytes, return everything the server sends until it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
