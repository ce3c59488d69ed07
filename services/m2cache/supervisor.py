"""Child processes started in order, watched, restarted with backoff, stopped in
reverse order: what ``m2cache up`` runs its services under.

One thread owns every child: it starts them (each waiting for its readiness
check), then polls them (``Popen.poll`` reaps an exited child at once, so none is
left a zombie), restarts a dead one after a backoff that doubles per quick death
(reset once a child has stayed up ``stable_s``), and on stop sends SIGTERM in
reverse start order and SIGKILL after the grace. Children get
``PR_SET_PDEATHSIG`` (Linux): if the supervising process dies, even by SIGKILL,
the kernel sends them SIGTERM, so no service or Redis outlives its stack. The
signal is set by util-linux ``setpriv`` exec'ed in front of the child's argv, so
no Python runs between fork and exec (a ``preexec_fn`` in a process with gRPC
threads can deadlock in the child on a lock another thread held at the fork);
without ``setpriv`` the child is started with ``preexec_fn`` as a fallback.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from m2cache.errors import FailedPrecondition

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) if os.name == "posix" else None


def _die_with_parent() -> None:
    """preexec_fn (only without setpriv): SIGTERM when the thread that forked us exits."""
    if _libc is not None and hasattr(_libc, "prctl"):
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_argv(argv: tuple[str, ...]) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` behind ``setpriv --pdeathsig TERM`` (same PID: setpriv execs it), and the
    preexec_fn to use instead when setpriv is missing."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    return list(argv), _die_with_parent


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]
    log_path: Path
    ready: Callable[["Child"], bool]  # True once the child serves (called every poll while starting)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None  # when a dead child is due to be started again

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Supervisor:
    """``start(stages)`` starts each stage's children together and blocks until they
    are all ready before the next stage (or raises, having stopped what it started);
    ``stop()`` stops them all, in reverse order. ``on_change`` is called (on the
    supervisor thread) after every restart, e.g. to rewrite a state file."""

    def __init__(self, start_timeout_s: float = 120.0, restart: bool = True, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, stable_s: float = 30.0, grace_s: float = 10.0, poll_s: float = 0.2,
                 on_change: Callable[[], None] | None = None):
        self.start_timeout_s, self.restart, self.grace_s, self.poll_s = start_timeout_s, restart, grace_s, poll_s
        self.initial_backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.on_change = on_change
        self.children: dict[str, Child] = {}
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- API (any thread) -----------------------------------------------------------
    def start(self, stages: list[list[ChildSpec]] | list[ChildSpec]) -> None:
        """``stages``: lists of children that depend only on earlier stages (a flat
        list: one child per stage)."""
        stages = [s if isinstance(s, list) else [s] for s in stages]
        self._thread = threading.Thread(target=self._main, args=(stages,), name="supervisor", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def pids(self) -> dict[str, int]:
        return {name: c.pid for name, c in self.children.items() if c.proc and c.proc.poll() is None}

    # ---- the supervisor thread -----------------------------------------------------------
    def _main(self, stages: list[list[ChildSpec]]) -> None:
        try:
            for stage in stages:
                self._start_ready(stage)
        except BaseException as err:  # noqa: BLE001 (handed to the caller of start)
            self._error = err
            self._stop_all()
            self._started.set()
            return
        self._started.set()
        while not self._stop.wait(self.poll_s):
            self._watch()
        self._stop_all()

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as out:
            if child.restarts:
                out.write(f"\n--- m2cache up: restart {child.restarts} of {spec.name} ---\n".encode())
                out.flush()
            argv, preexec = child_argv(spec.argv)
            # own session: a terminal's Ctrl-C reaches the supervisor only, which stops children in order
            child.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, **spec.env}, start_new_session=True, preexec_fn=preexec)
        child.started_at = time.monotonic()
        child.restart_at = None

    def _start_ready(self, stage: list[ChildSpec]) -> None:
        waiting = []
        for spec in stage:
            child = self.children[spec.name] = Child(spec, backoff_s=self.initial_backoff_s)
            self._spawn(child)
            waiting.append(child)
        deadline = time.monotonic() + self.start_timeout_s
        while waiting and time.monotonic() < deadline:
            if self._stop.is_set():
                raise FailedPrecondition(f"stopped while starting {', '.join(c.spec.name for c in waiting)}")
            for child in list(waiting):
                spec = child.spec
                if child.proc.poll() is not None:
                    tail = spec.log_path.read_text(errors="replace")[-2000:]
                    raise FailedPrecondition(f"{spec.name} exited with {child.proc.returncode} while starting "
                                             f"(log {spec.log_path}):\n{tail}")
                if spec.ready(child):
                    log.info("%s ready (pid %d)", spec.name, child.pid)
                    waiting.remove(child)
            if waiting:
                time.sleep(self.poll_s)
        if waiting:
            names = ", ".join(c.spec.name for c in waiting)
            raise FailedPrecondition(f"{names} not ready within {self.start_timeout_s:.0f}s "
                                     f"(logs in {waiting[0].spec.log_path.parent})")

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.restart_at is None:
                code = child.proc.poll()  # reaps
                if code is None:
                    continue
                up_s = now - child.started_at
                if up_s >= self.stable_s:
                    child.backoff_s = self.initial_backoff_s
                log.warning("%s (pid %d) exited with %s after %.1fs%s", child.spec.name, child.pid, code, up_s,
                            f"; restarting in {child.backoff_s:.1f}s" if self.restart else "")
                if not self.restart:
                    child.restart_at = float("inf")
                    continue
                child.restart_at = now + child.backoff_s
                child.backoff_s = min(child.backoff_s * 2, self.max_backoff_s)
            elif now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                log.warning("restarted %s (pid %d, restart %d)", child.spec.name, child.pid, child.restarts)
                if self.on_change:
                    self.on_change()

    def _stop_all(self) -> None:
        """SIGTERM in reverse start order, each given the grace, then SIGKILL; all reaped."""
        for child in reversed(list(self.children.values())):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing", child.spec.name, proc.pid, self.grace_s)
                proc.kill()
                proc.wait()
