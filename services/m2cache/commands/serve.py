"""``m2cache serve <service> [flags]``: run one gRPC service until SIGTERM.

Services register in :data:`SERVICES` (name -> module paths); each config
module provides ``add_arguments(parser)`` and a frozen ``*Config.from_args``,
each server module ``serve(config)``. Every flag also reads an env variable
``M2CACHE_<SERVICE>_<FLAG>`` (see ``--help``). Every service also takes the
transport-security flags of :mod:`m2cache.security` (``--tls-cert``, ``--tls-key``,
``--tls-ca``, ``--api-keys-file``, ``--token-file``); without them it serves
plaintext and says so in its log."""
from __future__ import annotations

import argparse
import importlib
import logging

from m2cache import security

# service -> (config module, config class, server module). Other teams add theirs here.
SERVICES: dict[str, tuple[str, str, str]] = {
    "store": ("m2cache.store.config", "StoreConfig", "m2cache.store.server"),
    "dram": ("m2cache.dram.config", "DramConfig", "m2cache.dram.server"),
    "ranker": ("m2cache.ranker.config", "RankerConfig", "m2cache.ranker.server"),
    "worker": ("m2cache.worker.config", "WorkerConfig", "m2cache.worker.server"),
    "gateway": ("m2cache.gateway.config", "GatewayConfig", "m2cache.gateway.server"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run a gRPC service (store, dram, ...)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    services = parser.add_subparsers(dest="service", required=True)
    for name, (config_module, _cls, _server) in SERVICES.items():
        sub = services.add_parser(name, help=f"the {name} service",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(config_module).add_arguments(sub)
        security.add_arguments(sub, name)
    return parser


def build_config(args: argparse.Namespace):
    """The service's frozen config from parsed flags (the only place it is built)."""
    config_module, cls, _server = SERVICES[args.service]
    return getattr(importlib.import_module(config_module), cls).from_args(args)


def main(args: argparse.Namespace) -> int:
    config = build_config(args)
    sec = security.SecurityConfig.from_args(args)
    security.install(sec)
    log = logging.getLogger(f"m2cache.{args.service}")
    log.info("starting %s: %s", args.service, config)
    if not sec.tls:
        log.warning("%s serves PLAINTEXT with no client authentication: keep it on loopback or a private network "
                    "(m2cache up --secure, or --tls-cert/--tls-key/--tls-ca)", args.service)
    importlib.import_module(SERVICES[args.service][2]).serve(config)
    return 0
