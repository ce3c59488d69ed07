"""``m2cache status``: health and key stats of every service of the running stack."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2cache import grpc_util
from m2cache.stack import pid_alive, read_state, state_security

HEALTH = {"store": "m2cache.v1.NeuronStore", "dram": "m2cache.v1.DramTier", "ranker": "m2cache.v1.Ranker"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("status", help="health and stats of the running stack", description=__doc__)
    p.add_argument("--state-file", type=Path, default=Path("runs/stack.json"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def collect(state: dict) -> dict:
    from google.protobuf.json_format import MessageToDict

    from m2cache_client.pb import common_pb2, dram_pb2_grpc, worker_pb2_grpc

    sec = state_security(state)
    meta = (("authorization", f"Bearer {sec.token}"),) if sec.token_file else ()
    out = {name: {"target": state[name], "health": grpc_util.check_health(state[name], svc, security=sec)}
           for name, svc in HEALTH.items()}
    with grpc_util.channel(state["dram"], security=sec) as ch:
        try:
            out["dram"]["stats"] = MessageToDict(dram_pb2_grpc.DramTierStub(ch).GetStats(common_pb2.StatsRequest(), timeout=5))
        except Exception as err:  # report, don't crash: status is for looking at a sick stack
            out["dram"]["error"] = str(err)
    for i, target in enumerate(state["workers"]):
        entry = out[f"worker-{i}"] = {"target": target,
                                      "health": grpc_util.check_health(target, "m2cache.v1.Worker", security=sec)}
        with grpc_util.channel(target, security=sec) as ch:
            try:
                entry["stats"] = MessageToDict(worker_pb2_grpc.WorkerStub(ch).GetStats(
                    common_pb2.StatsRequest(), timeout=5, metadata=meta))
            except Exception as err:
                entry["error"] = str(err)
    out["pids"] = {name: {"pid": pid, "alive": pid_alive(pid)} for name, pid in state.get("pids", {}).items()}
    return out


def main(args: argparse.Namespace) -> int:
    report = collect(read_state(args.state_file))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, entry in report.items():
            if name == "pids":
                continue
            stats = entry.get("stats", {})
            keys = ("tokens", "hbmHitRate", "active", "bytesFromRedis", "bytesFromStore", "redisUp")
            brief = ", ".join(f"{k}={stats[k]}" for k in keys if k in stats)
            print(f"{name:10s} {entry['target']:22s} {entry['health']:12s} {brief}")
    healthy = all(e.get("health") == "SERVING" for n, e in report.items() if n != "pids")
    return 0 if healthy else 1
