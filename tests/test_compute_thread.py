"""worker/compute.py: one thread for a worker's tensor work. Calls run in order with
their results and exceptions returned to the caller; a long call (the decode loop)
runs the calls submitted meanwhile between its steps; and a served worker builds
its model, decodes and runs later tensor work all on that one thread (two OpenMP
thread teams halve the decode speed on this machine: docs/BENCHMARKS.md)."""
from __future__ import annotations

import threading
import time

import pytest

from m2cache.worker.compute import ComputeThread
from tiers import DramHandle
from worker_stack import WorkerHandle, reference_tokens

MODEL = "tinystories-656k"
PROMPT = [1, 365, 118, 263, 431]


def test_calls_run_in_order_on_one_thread_and_raise_where_they_were_made():
    compute = ComputeThread("test-compute")
    try:
        seen = []
        futures = [compute.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i)
                   for i in range(5)]
        assert [f.result(5) for f in futures] == list(range(5))
        assert seen == [(i, "test-compute") for i in range(5)]
        with pytest.raises(ZeroDivisionError):
            compute.call(lambda: 1 / 0)
        assert compute.call(lambda: 7) == 7  # the thread survives a failed call
        assert compute.call(lambda: compute.call(lambda: 3)) == 3  # a call from the thread itself runs inline
    finally:
        compute.close()


def test_a_long_call_runs_what_is_submitted_meanwhile():
    compute = ComputeThread("test-loop")
    stop, woken = threading.Event(), threading.Event()

    def loop():  # as the engine's: wait for work, run the pending calls between steps
        compute.waker = woken.set
        while not stop.is_set():
            compute.run_pending()
            if not compute.has_pending():  # (a call submitted before the waker was set is pending)
                woken.wait(1.0)
            woken.clear()
        compute.waker = None
        return "loop done"

    running = compute.submit(loop)
    try:
        start = time.monotonic()
        assert compute.call(lambda: threading.current_thread().name) == "test-loop"
        assert time.monotonic() - start < 0.5  # woken at once, not at the loop's next timeout
    finally:
        stop.set()
        woken.set()
    assert running.result(5) == "loop done"
    compute.close()


def test_a_worker_builds_decodes_and_runs_later_work_on_one_thread(store_service, redis_proc, monkeypatch):
    from m2cache.model import model as model_mod
    from m2cache.worker import runtime as runtime_mod

    want = reference_tokens(store_service.catalog.get(MODEL), PROMPT, 8)  # (in this thread: before the patch)
    threads = {"build": set(), "forward": set()}
    build = runtime_mod._build_model
    forward = model_mod.CausalLM.forward

    def built(*args, **kwargs):
        threads["build"].add(threading.get_ident())
        return build(*args, **kwargs)

    def stepped(self, *args, **kwargs):
        threads["forward"].add(threading.get_ident())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(runtime_mod, "_build_model", built)
    monkeypatch.setattr(model_mod.CausalLM, "forward", stepped)
    dram = DramHandle(store_service.target, redis_proc.url, budget_bytes=64 << 20, num_pinned_layers=2,
                      preload_precisions="full")
    worker = WorkerHandle(dram.target, MODEL, cache_fraction=0.5)
    try:
        assert worker.generate(PROMPT, 8)[0] == want
        later = worker.runtime.compute.call(threading.get_ident)  # while the decode loop holds the thread
        assert len(threads["build"]) == 1 and threads["forward"] == threads["build"] == {later}
        assert later != threading.get_ident()
    finally:
        worker.stop()
        dram.stop()
