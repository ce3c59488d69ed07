"""``m2cache health HOST:PORT [--service NAME]``: one grpc.health.v1 Check, for
container healthchecks (docker compose) and scripts. Exit 0 when SERVING, 1
otherwise (NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN or UNREACHABLE). Against a
TLS service give ``--tls-ca`` (and, for mTLS, ``--tls-cert``/``--tls-key``), or
the env variables ``M2CACHE_HEALTH_TLS_CA`` ... (what the container probes use)."""
from __future__ import annotations

import argparse

from m2cache import security
from m2cache.grpc_util import check_health


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("health", help="check a service's gRPC health (exit 0 when SERVING)")
    p.add_argument("address", metavar="HOST:PORT", help="gRPC address of the service")
    p.add_argument("--service", default="", help="health service name (default '': the whole server)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (default 2)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    security.add_arguments(p, "health")
    return p


def main(args: argparse.Namespace) -> int:
    status = check_health(args.address, args.service, timeout_s=args.timeout,
                          security=security.SecurityConfig.from_args(args))
    if not args.quiet:
        print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    # `python -m m2cache.commands.health HOST:PORT`: the same check without loading every
    # subcommand (and torch) through m2cache.cli, for healthchecks run every few seconds.
    import sys

    _parser = argparse.ArgumentParser(prog="python -m m2cache.commands.health")
    add_parser(_parser.add_subparsers(dest="command"))
    sys.exit(main(_parser.parse_args(["health", *sys.argv[1:]])))
