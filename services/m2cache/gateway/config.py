"""Gateway configuration: one frozen dataclass, built from flags/env in the entry point."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from m2cache import envflags
from m2cache.errors import InvalidArgument

ENV_PREFIX = "gateway"
DESCRIPTION = """The OpenAI-compatible HTTP gateway in front of the workers.

Sampling defaults follow OpenAI's API, not the m2cache CLI: a request without
"temperature" samples at 1.0 (--default-temperature), while `m2cache generate`,
`m2cache run` and the client library are greedy (temperature 0); send
"temperature": 0 for greedy tokens. max_tokens defaults to 16 (OpenAI's
completions default, --default-max-tokens)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    workers: str = "127.0.0.1:50070"  # comma-separated worker targets, or one dns:///name:port
    model: str = ""                   # the model name the workers serve (reported by /v1/models)
    address: str = "127.0.0.1:8000"   # HTTP listen host:port (port 0 = any)
    timeout_s: float = 300.0          # deadline of one completion
    default_max_tokens: int = 16      # OpenAI's default for /v1/completions
    default_temperature: float = 1.0  # OpenAI's default; the CLI's is 0 (greedy)
    tiers: str = ""                   # name=target,... of tiers whose health gates readiness (e.g. dram=host:port)
    max_concurrent: int = 64          # generations in flight; more get 429 at once
    max_connections: int = 1024       # open HTTP connections; requests beyond get 503
    max_body_bytes: int = 4 << 20     # request body cap (413 above)
    max_prompt_chars: int = 1 << 20   # prompt / message text cap (400 above)
    header_timeout_s: float = 10.0    # a request's headers must arrive within this (408, connection closed)
    body_timeout_s: float = 30.0      # and its body within this after the headers (408)
    keep_alive_s: float = 5.0         # idle keep-alive connections are closed after this
    backlog: int = 2048               # listen backlog: bursts wait in it instead of being reset
    health_cache_s: float = 1.0       # /health re-probes workers and tiers at most this often
    grace_s: float = 10.0             # on SIGTERM, in-flight requests get this long

    def __post_init__(self) -> None:
        if not self.worker_targets():
            raise InvalidArgument("gateway needs --workers")
        if not self.model:
            raise InvalidArgument("gateway needs --model")
        positive = ("timeout_s", "default_max_tokens", "max_concurrent", "max_connections", "max_body_bytes",
                    "max_prompt_chars", "header_timeout_s", "body_timeout_s", "keep_alive_s", "backlog")
        bad = [n for n in positive if getattr(self, n) <= 0]
        if bad or not 0 <= self.default_temperature <= 2:
            raise InvalidArgument(f"gateway config values out of range: {', '.join(bad) or 'default_temperature'}")
        self.tier_targets()  # validates

    def worker_targets(self) -> list[str]:
        return [t.strip() for t in self.workers.split(",") if t.strip()]

    def tier_targets(self) -> dict[str, str]:
        out = {}
        for item in filter(None, (t.strip() for t in self.tiers.split(","))):
            name, sep, target = item.partition("=")
            if not sep or not name or not target:
                raise InvalidArgument(f"--tiers wants name=host:port items, got {item!r}")
            out[name] = target
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "GatewayConfig":
        return envflags.config_from_args(cls, args, ENV_PREFIX)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    envflags.add_config_arguments(parser, GatewayConfig, ENV_PREFIX)
