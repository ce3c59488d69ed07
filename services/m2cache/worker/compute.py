"""One thread for all of a worker's tensor work: its model is built there and its
decode loop runs there.

OpenMP (torch's and the C kernels') keeps a team of threads per thread that starts
parallel regions. When the model is built on one thread and decoded on another,
the process holds two teams, more OpenMP threads than cores, and libgomp then
stops spinning between regions ("throttled" waits): every parallel region wakes
sleeping threads. Measured on SmolLM2-135M's dense path here (2 cores): 97-111 tok/s
when one thread built and decoded, 35-47 when the main thread built and a second
thread decoded, 72-88 when a thread that had exited built it (docs/BENCHMARKS.md). So a worker submits
its build and its loop to one ComputeThread; nothing else in the process should
run tensor work while it serves.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable


class ComputeThread:
    """A thread running submitted calls in order. One call may hold it for the worker's
    life (the decode loop): that call runs the others between its steps (``run_pending``)
    and sets ``waker`` to be told when one arrives."""

    def __init__(self, name: str = "decode-loop"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.waker: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            self._execute(item)
            del item  # else the last call's arguments (an engine, its caches) live until the next one

    @staticmethod
    def _execute(item) -> None:
        fn, args, future = item
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # the caller's future re-raises it
            future.set_exception(err)

    def has_pending(self) -> bool:
        return not self._tasks.empty()

    def run_pending(self) -> None:
        """Run the calls submitted so far (from the long call holding the thread)."""
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                return
            if item is None:  # a close: the thread ends once the long call returns
                self._tasks.put(None)
                return
            self._execute(item)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._tasks.put((fn, args, future))
        waker = self.waker
        if waker is not None:
            waker()
        return future

    def call(self, fn: Callable, *args):
        """``fn(*args)`` on this thread, waited for (its exception re-raised here)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.submit(fn, *args).result()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the calls already submitted (a running loop must have been told to end)."""
        self._tasks.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
