"""The whole stack as local supervised processes: Redis, store, DRAM tier, ranker,
workers and the HTTP gateway, started in order with readiness waits, restarted
when they die, stopped (all of them, Redis included) when the stack stops.
``m2cache up`` is a thin CLI over :class:`Stack`."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from m2cache.stack.config import SERVICE_CONFIGS, StackConfig
from m2cache.stack.secrets import Secrets, make_secrets, unused_data_plane_secrets
from m2cache.stack.services import child_specs
from m2cache.supervisor import Supervisor

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


class Stack:
    """``start()`` (blocks until every service is ready), ``stop()``; ``pids()`` and
    ``log_dir`` for operators and tests. ``progress`` gets one line per step."""

    def __init__(self, config: StackConfig, progress=None):
        self.config = config
        self.run_id = new_run_id()
        self.log_dir = Path(config.log_dir) / self.run_id  # a log per run, never appended across runs
        self.secrets: Secrets | None = None
        self.progress = progress or (lambda line: None)
        self.supervisor = Supervisor(start_timeout_s=config.start_timeout_s, restart=config.restart,
                                     on_change=self._write_state)

    def start(self) -> None:
        c = self.config
        if c.secure:
            self.progress(f"secure: certificates, API key and data-plane secrets in {Path(c.run_dir) / 'secure'}")
            self.secrets = make_secrets(c.run_dir, c.host)
            missing = unused_data_plane_secrets(SERVICE_CONFIGS.values())
            if missing:
                log.warning("no service takes %s yet: records in shared tiers are not MAC'd / Redis has no "
                            "password until the data plane supports them", ", ".join(missing))
        specs = child_specs(c, self.log_dir, self.secrets)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        _link_latest(Path(c.log_dir), self.log_dir)
        total, done = len(specs), []
        for i, spec in enumerate(specs):  # one progress line as each becomes ready
            def announce(child, ready=spec.ready, name=spec.name):
                ok = ready(child)
                if ok:
                    done.append(name)
                    self.progress(f"[{len(done)}/{total}] {name} ready (pid {child.pid})")
                return ok

            specs[i] = dataclasses.replace(spec, ready=announce)
        self.progress(f"starting {total} processes (logs in {self.log_dir})")
        self.supervisor.start(stages(specs))
        self._write_state()

    def stop(self) -> None:
        self.supervisor.stop()
        Path(self.config.state_file).unlink(missing_ok=True)
        shutil.rmtree(Path(self.config.run_dir) / "redis" / str(self.config.base_port + 9), ignore_errors=True)

    def pids(self) -> dict[str, int]:
        return self.supervisor.pids()

    def state(self) -> dict:
        """What ``m2cache generate``/``status`` and clients need: addresses, and in a
        secure stack the client certificate and the API key file."""
        c = self.config
        gateway = ""
        if c.gateway:
            gateway = f"{'https' if self.secrets else 'http'}://{c.target('gateway')}"
        state = {
            "run_id": self.run_id, "model": c.model, "secure": bool(self.secrets),
            "store": c.target("store"), "dram": c.target("dram"), "ranker": c.target("ranker"),
            "redis": c.target("redis"), "workers": c.worker_targets(), "gateway": gateway,
            "pids": self.pids(), "log_dir": str(self.log_dir.resolve()),
            "config": {k: str(v) for k, v in asdict(c).items()},
        }
        if self.secrets:
            client = self.secrets.client_security()
            state["tls"] = {"ca": client.tls_ca, "cert": client.tls_cert, "key": client.tls_key}
            state["api_key_file"] = str(self.secrets.api_keys)
        return state

    def _write_state(self) -> None:
        path = Path(self.config.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, path)


def stages(specs) -> list[list]:
    """Start order by dependency: Redis and the store; the DRAM tier (needs both) and
    the ranker (needs the store only, so it starts beside the tier); the workers, all
    at once; the gateway."""
    by_stage: dict[int, list] = {}
    rank = {"redis": 0, "store": 0, "dram": 1, "ranker": 1, "worker": 2, "gateway": 3}
    for spec in specs:
        by_stage.setdefault(rank[spec.name.split("-", 1)[0]], []).append(spec)
    return [by_stage[k] for k in sorted(by_stage)]


def _link_latest(base: Path, run: Path) -> None:
    latest = base / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run.name)
    except OSError:  # a filesystem without symlinks: the run directory is still printed
        pass
