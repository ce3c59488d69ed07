"""HBM neuron cache: slot bookkeeping, windowing, budget, swap-with-last eviction."""
import torch

from m2cache.codec.format import Precision
from m2cache.worker.neuron_cache import NeuronCache, PrecisionSlots


def records_for(ids: torch.Tensor, rb: int = 8) -> torch.Tensor:
    # record bytes encode the id so a misplaced row is detected
    return (ids.unsqueeze(1) * 7 + torch.arange(rb)).remainder(256).to(torch.uint8)


def check_consistent(s: PrecisionSlots) -> None:
    live = s.slot_ids[: s.num_used]
    assert bool((live >= 0).all()) and bool((s.slot_ids[s.num_used:] == -1).all())
    assert torch.equal(s.where[live], torch.arange(s.num_used))
    assert int((s.where >= 0).sum()) == s.num_used
    assert torch.equal(s.slots[: s.num_used], records_for(live))


def test_admit_gather_and_swap_with_last_eviction():
    s = PrecisionSlots(num_neurons=50, record_bytes=8, capacity=6, window=2, device=torch.device("cpu"))
    a = torch.tensor([3, 9, 1, 40])
    s.touch(a, step=0)
    assert s.admit(a, records_for(a), step=0) == 4
    assert torch.equal(s.gather(torch.tensor([40, 3])), records_for(torch.tensor([40, 3])))
    # step 1 uses 9 and 2 new ones; 3, 1, 40 were used at step 0 (still in a window of 2)
    b = torch.tensor([9, 7, 8])
    s.touch(b, step=1)
    new = b[~s.contains(b)]
    assert s.admit(new, records_for(new), step=1) == 2
    check_consistent(s)
    # step 2: a window of 2 keeps steps 1..2, so only 3, 1, 40 (step 0) may leave:
    # 3 of the 4 new neurons get rows, the 4th is computed uncached.
    c = torch.tensor([11, 12, 13, 14])
    s.touch(c, step=2)
    assert s.admit(c, records_for(c), step=2) == 3
    check_consistent(s)
    assert set(s.slot_ids[: s.num_used].tolist()) == {9, 7, 8, 11, 12, 13}
    for nid in (9, 7, 8):  # in the window: never evicted
        assert bool(s.contains(torch.tensor([nid])))


def test_window_wins_over_admission():
    s = PrecisionSlots(num_neurons=20, record_bytes=4, capacity=3, window=3, device=torch.device("cpu"))
    for step, ids in enumerate(([0, 1, 2], [3, 4], [5])):
        ids = torch.tensor(ids)
        s.touch(ids, step)
        miss = ids[~s.contains(ids)]
        admitted = s.admit(miss, records_for(miss, 4), step)
        check_consistent_rb(s)
        if step > 0:
            assert admitted == 0  # all three rows hold neurons used within the window
    assert sorted(s.slot_ids.tolist()) == [0, 1, 2]


def check_consistent_rb(s):
    live = s.slot_ids[: s.num_used]
    assert torch.equal(s.where[live], torch.arange(s.num_used))
    assert torch.equal(s.slots[: s.num_used], records_for(live, s.record_bytes))


def test_random_workload_keeps_invariants():
    g = torch.Generator().manual_seed(0)
    s = PrecisionSlots(num_neurons=200, record_bytes=8, capacity=40, window=2, device=torch.device("cpu"))
    for step in range(200):
        ids = torch.randperm(200, generator=g)[: int(torch.randint(1, 30, (1,), generator=g))]
        s.touch(ids, step)
        miss = ids[~s.contains(ids)]
        s.admit(miss, records_for(miss), step)
        check_consistent(s)
        assert s.num_used <= s.capacity


def test_budget_split_respected():
    rb = {Precision.FULL: 300, Precision.INT8: 100, Precision.INT4: 50}
    cache = NeuronCache.with_budget(4, 1000, rb, budget_bytes=120_000, shares={Precision.FULL: 0.5, Precision.INT8: 0.3, Precision.INT4: 0.2}, window=2)
    assert cache.budget_bytes <= 120_000
    assert cache.slots(0, Precision.FULL).capacity == 30_000 * 0.5 // 300
    full = NeuronCache.with_budget(2, 10, rb, budget_bytes=10**9, shares={p: 1 / 3 for p in Precision}, window=1)
    assert all(full.slots(0, p).capacity == 10 for p in Precision)
