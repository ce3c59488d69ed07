"""The worker's usage reports to the DRAM tier (worker/records.Reporter): uses queued
within one interval leave in one report, in order, none lost; a tier that is away
costs dropped reports, not a stalled or failing worker; close sends what is queued."""
from __future__ import annotations

import threading
import time

from m2cache.worker.records import Reporter


def _recorder():
    sent, lock = [], threading.Lock()

    def send(current_layer, uses):
        with lock:
            sent.append((current_layer, list(uses)))
    return sent, send


def test_uses_queued_within_an_interval_leave_in_one_report():
    sent, send = _recorder()
    reporter = Reporter(send, interval_s=0.2)
    try:
        for layer in range(30):  # one token's layer fetches, far quicker than the interval
            reporter.add(layer, f"use-{layer}")
        deadline = time.monotonic() + 5
        while reporter.sent < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        reporter.close()
    assert reporter.sent == 30 and reporter.dropped == 0
    assert len(sent) <= 2  # not one RPC per layer
    assert [u for _, batch in sent for u in batch] == [f"use-{i}" for i in range(30)]
    assert sent[-1][0] == 29  # the latest layer says where the worker is


def test_a_tier_that_is_away_drops_reports_and_close_sends_what_is_queued():
    calls = []

    def failing(current_layer, uses):
        calls.append(len(uses))
        raise ConnectionError("tier away")
    reporter = Reporter(failing, interval_s=0.01, backoff_s=0.05)
    for layer in range(5):
        reporter.add(layer, layer)
    deadline = time.monotonic() + 5
    while reporter.dropped < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.close()
    assert reporter.dropped == 5 and reporter.sent == 0 and sum(calls) == 5

    sent, send = _recorder()
    reporter = Reporter(send, interval_s=10.0)  # nothing would leave for 10 s ...
    reporter.add(3, "last")
    start = time.monotonic()
    reporter.close()  # ... but close does not wait the interval out, and sends it
    assert time.monotonic() - start < 5 and sent == [(3, ["last"])]
