"""Unit tests of the pure-Python layer-aware DRAM policy (no Redis, no gRPC)."""
from __future__ import annotations

import random

import pytest

from m2cache.dram.policy import LayerAwarePolicy, UnitKey
from m2cache.errors import InvalidArgument

M = "m"
L = 8          # layers
REC = 100      # bytes per record
N = 10         # neurons per layer -> 1000 B per full layer unit


def full_layer(policy, layer, pinned=False, prec=1):
    """Reserve a whole layer unit and commit it (its Redis writes done)."""
    res = policy.reserve(UnitKey(M, layer, prec), range(N), REC, pinned=pinned)
    if res is not None:
        policy.commit(res)
    return res


def make(budget=5000, pinned=2, ahead=2, clock=None):
    policy = LayerAwarePolicy(budget, pinned, ahead, caller_ttl_s=10.0, **({"clock": clock} if clock else {}))
    policy.register_model(M, L)
    return policy


def test_window_is_k_layers_ahead_wrapping_and_skips_pinned():
    policy = make(pinned=2, ahead=3)
    assert policy.observe("a", M, 3) == [4, 5, 6]
    assert policy.observe("a", M, 6) == [7]          # 8 and 9 wrap to layers 0 and 1: pinned
    assert policy.observe("a", M, 7) == [2]          # 0, 1 pinned, 2 dynamic
    assert make(pinned=0, ahead=20).observe("a", M, 0) == list(range(1, L))  # never more than a cycle


def test_distance_counts_steps_to_next_entry_by_any_live_caller():
    policy = make()
    assert policy.distance(UnitKey(M, 5, 1)) == L    # nobody live
    policy.observe("a", M, 3)
    assert policy.distance(UnitKey(M, 4, 1)) == 1
    assert policy.distance(UnitKey(M, 3, 1)) == L    # a is in layer 3 now: next entry is a full cycle away
    assert policy.distance(UnitKey(M, 2, 1)) == L - 1
    policy.observe("b", M, 1)
    assert policy.distance(UnitKey(M, 3, 1)) == 2    # b reaches it first


def test_eviction_takes_the_farthest_layer_first():
    policy = make(budget=3000, pinned=0)
    for layer in (2, 4, 5):
        assert full_layer(policy, layer) is not None
    policy.observe("a", M, 3)                       # needs 4, 5 next; 2 is a cycle away
    res = full_layer(policy, 6)
    assert res is not None and [k.layer for k, _ in res.evicted] == [2]
    assert set(policy.units()) == {UnitKey(M, 4, 1), UnitKey(M, 5, 1), UnitKey(M, 6, 1)}


def test_a_reservation_never_evicts_layers_needed_sooner():
    policy = make(budget=2000, pinned=0)
    policy.observe("a", M, 3)
    assert full_layer(policy, 4) and full_layer(policy, 5)
    assert full_layer(policy, 3) is None            # the layer being left cannot push out 4 and 5
    assert policy.bytes_resident == 2000 and policy.num_evictions == 0


def test_pinned_layers_are_never_evicted():
    policy = make(budget=3000, pinned=2)
    assert full_layer(policy, 0, pinned=True) and full_layer(policy, 1, pinned=True)
    policy.observe("a", M, 5)
    assert full_layer(policy, 6) is not None
    assert full_layer(policy, 7) is None            # only dynamic units may go, and 6 is needed sooner
    assert full_layer(policy, 2, pinned=True) is not None  # a pin evicts dynamic units only
    assert {k.layer for k in policy.units()} == {0, 1, 2}
    assert full_layer(policy, 3, pinned=True) is None       # never another pin
    assert all(pinned for _, pinned in policy.units().values())


def test_busy_units_are_neither_evicted_nor_forgotten():
    policy = make(budget=1000, pinned=0)
    policy.observe("a", M, 5)
    res = policy.reserve(UnitKey(M, 5, 1), range(N), REC)
    policy.forget(UnitKey(M, 5, 1), range(N))       # writes in flight: keep counting them
    assert policy.bytes_resident == 1000
    assert full_layer(policy, 6) is None            # cannot evict a unit being written
    policy.commit(res)
    assert full_layer(policy, 6) is not None


def test_failed_write_gives_the_bytes_back():
    policy = make()
    res = policy.reserve(UnitKey(M, 4, 2), [1, 2, 3], REC)
    policy.commit(res, ok=False)
    assert policy.bytes_resident == 0 and policy.resident(UnitKey(M, 4, 2), [1, 2, 3]) == [False] * 3


def test_partial_units_and_duplicates_are_counted_once():
    policy = make()
    key = UnitKey(M, 4, 3)
    policy.commit(policy.reserve(key, [1, 1, 2], REC))
    res = policy.reserve(key, [2, 3], REC)
    assert res.neuron_ids == (3,)
    assert policy.bytes_resident == 3 * REC and policy.num_resident(key) == 3


def test_stale_callers_stop_steering():
    now = [0.0]
    policy = make(clock=lambda: now[0])
    policy.observe("a", M, 3)
    assert policy.distance(UnitKey(M, 4, 1)) == 1
    now[0] = 11.0
    assert policy.distance(UnitKey(M, 4, 1)) == L


def test_budget_is_never_exceeded_under_random_traffic():
    rng = random.Random(0)
    policy = make(budget=4321, pinned=2, ahead=2)
    for _ in range(3000):
        cid = f"w{rng.randrange(3)}"
        policy.observe(cid, M, rng.randrange(L))
        key = UnitKey(M, rng.randrange(L), rng.randrange(1, 4))
        ids = rng.sample(range(N), rng.randrange(1, N + 1))
        res = policy.reserve(key, ids, REC, pinned=policy.is_pinned(key.layer))
        if res is not None:
            policy.commit(res, ok=rng.random() > 0.05)
        if rng.random() < 0.1:
            policy.forget(key, ids[:2])
        assert 0 <= policy.bytes_resident <= policy.budget_bytes
        assert policy.bytes_resident == sum(n * REC for n, _ in policy.units().values())
    assert policy.num_evictions > 0


def test_bad_configuration_is_refused():
    with pytest.raises(InvalidArgument):
        LayerAwarePolicy(-1, 0, 0)


def test_can_admit_is_a_dry_run_of_reserve():
    policy = make(budget=1500, pinned=0)
    assert full_layer(policy, 4)
    assert not policy.can_admit(UnitKey(M, 5, 1), N, REC)     # 4 is needed as soon as 5 (nobody live)
    policy.observe("a", M, 4)                                 # now 4 is a full cycle away, 5 is next
    assert policy.can_admit(UnitKey(M, 5, 1), N, REC)
    assert policy.bytes_resident == 1000 and policy.num_evictions == 0


def test_auto_preload_precisions_follow_the_policy():
    from m2cache.codec.format import Precision
    from m2cache.dram.config import DramConfig

    auto = DramConfig()
    assert auto.precisions(None) == (Precision.FULL,)  # no policy: workers only ask for FULL
    policy = {"ratios": {"full": 0.2, "int8": 0.0, "int4": 0.3}}
    assert auto.precisions(policy) == (Precision.FULL, Precision.INT4)
    explicit = DramConfig(preload_precisions="int8,full")
    assert explicit.precisions(policy) == (Precision.INT8, Precision.FULL)


def test_admission_without_eviction_keeps_what_is_resident():
    """preload="used": a full tier refuses new records rather than evicting (no SSD re-reads)."""
    policy = make(budget=3000, pinned=0)
    policy.observe("w", M, 0)
    for layer in (3, 4, 5):
        assert full_layer(policy, layer) is not None
    assert policy.bytes_resident == 3000
    key = UnitKey(M, 1, 1)
    assert not policy.can_admit(key, 1, REC, evict=False)
    assert policy.reserve(key, [0], REC, evict=False) is None
    assert policy.bytes_resident == 3000 and policy.num_resident(UnitKey(M, 5, 1)) == N
    assert policy.can_admit(key, 1, REC)  # with eviction (layer 5 is needed later than layer 1) it fits
