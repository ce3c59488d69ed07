"""HBM neuron cache: slot bookkeeping, windowing, budget, rows reused in place,
and the per-layer call handing the compute bands that read hits in place."""
import pytest
import torch

from m2cache.codec.format import Precision
from m2cache.worker import neuron_cache
from m2cache.worker.neuron_cache import NeuronCache, PrecisionSlots


@pytest.fixture(params=["c", "torch"], autouse=True)
def bookkeeping(request, monkeypatch):
    """Every test runs on both implementations of the slot bookkeeping (slots.c, torch)."""
    if request.param == "c":
        assert neuron_cache._slots_library() is not None, "slots.c did not build: no C compiler?"
    else:
        monkeypatch.setattr(neuron_cache, "_slots_library", lambda: None)
    return request.param


def records_for(ids: torch.Tensor, rb: int = 8) -> torch.Tensor:
    # record bytes encode the id so a misplaced row is detected
    return (ids.unsqueeze(1) * 7 + torch.arange(rb)).remainder(256).to(torch.uint8)


def check_consistent(s: PrecisionSlots) -> None:
    used = (s.neuron_at >= 0).nonzero().flatten()
    live = s.neuron_at[used]
    assert used.numel() == s.num_used <= s.capacity
    assert torch.equal(s.row_of[live], used)
    assert int((s.row_of >= 0).sum()) == s.num_used
    assert torch.equal(s.records[used], records_for(live, s.record_bytes))


def admit(s: PrecisionSlots, ids: torch.Tensor, step: int) -> int:
    """What NeuronCache does for one precision: look up (marking the step's neurons used),
    admit the misses' records where the window allows -> how many were admitted."""
    rows, miss_ids, miss_pos = s.lookup(ids, step)
    assert torch.equal(miss_ids, ids[rows < 0]) and torch.equal(ids[miss_pos], miss_ids)
    which = s.admit(miss_ids, miss_pos, records_for(miss_ids, s.record_bytes), rows, step)
    cached = torch.ones(ids.numel(), dtype=torch.bool) if which is None else which == 0
    assert torch.equal(s.row_of[ids[cached]], rows[cached])  # the band reads admitted misses from their rows
    assert bool((s.row_of[ids[~cached]] == -1).all())  # and the rest from the fetched table
    assert torch.equal(rows[~cached], torch.arange(int((~cached).sum())) + int(cached[miss_pos].sum()))
    return int(cached[miss_pos].sum())


def test_admit_evict_and_rows_reused_in_place():
    s = PrecisionSlots(num_neurons=50, record_bytes=8, capacity=6, window=2, device=torch.device("cpu"))
    assert admit(s, torch.tensor([3, 9, 1, 40]), step=0) == 4
    check_consistent(s)
    rows_before = s.row_of[torch.tensor([9])].clone()
    # step 1 uses 9 and 2 new ones; 3, 1, 40 were used at step 0 (still in a window of 2)
    assert admit(s, torch.tensor([9, 7, 8]), step=1) == 2
    check_consistent(s)
    # step 2: a window of 2 keeps steps 1..2, so only 3, 1, 40 (step 0) may leave:
    # 3 of the 4 new neurons get rows, the 4th is computed uncached.
    assert admit(s, torch.tensor([11, 12, 13, 14]), step=2) == 3
    check_consistent(s)
    assert set(s.neuron_at[s.neuron_at >= 0].tolist()) == {9, 7, 8, 11, 12, 13}
    assert torch.equal(s.row_of[torch.tensor([9])], rows_before), "a cached neuron never moves"


def test_window_wins_over_admission():
    s = PrecisionSlots(num_neurons=20, record_bytes=4, capacity=3, window=3, device=torch.device("cpu"))
    for step, ids in enumerate(([0, 1, 2], [3, 4], [5])):
        admitted = admit(s, torch.tensor(ids), step)
        check_consistent(s)
        if step > 0:
            assert admitted == 0  # all three rows hold neurons used within the window
    assert sorted(s.neuron_at.tolist()) == [0, 1, 2]


def test_random_workload_keeps_invariants():
    g = torch.Generator().manual_seed(0)
    s = PrecisionSlots(num_neurons=200, record_bytes=8, capacity=40, window=2, device=torch.device("cpu"))
    for step in range(200):
        ids = torch.randperm(200, generator=g)[: int(torch.randint(1, 30, (1,), generator=g))]
        admit(s, ids, step)
        check_consistent(s)


def test_c_and_torch_bookkeeping_agree(monkeypatch):
    """The same workload through slots.c and through torch leaves the same rows, in the
    same places (free rows first, then least recently used outside the window, ties by row)."""
    states = []
    for impl in ("c", "torch"):
        if impl == "torch":
            monkeypatch.setattr(neuron_cache, "_slots_library", lambda: None)
        g = torch.Generator().manual_seed(1)
        s = PrecisionSlots(num_neurons=300, record_bytes=8, capacity=50, window=3, device=torch.device("cpu"))
        log = []
        for step in range(150):
            ids = torch.randperm(300, generator=g)[: int(torch.randint(1, 40, (1,), generator=g))].sort().values
            log.append(admit(s, ids, step))
        states.append((s.neuron_at.clone(), s.row_of.clone(), s.last_used.clone(), s.num_used, log))
    (a, b) = states
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:]


def test_bands_read_hits_in_place_and_surplus_from_the_fetch():
    rb = {p: 8 for p in Precision}
    cache = NeuronCache(1, 100, rb, {Precision.FULL: 4}, window=2)
    fetched = []

    def take(prec, ids):
        fetched.append(ids.tolist())
        return records_for(ids)

    (band,) = cache.bands(0, {Precision.FULL: torch.tensor([2, 5, 7])}, 1, take)
    assert fetched == [[2, 5, 7]] and band.which is None
    slots = cache.slots(0, Precision.FULL)
    assert band.tables[0].data_ptr() == slots.records.data_ptr()  # the slot matrix itself
    assert torch.equal(band.gather(), records_for(torch.tensor([2, 5, 7])))
    # next step: 5 is a hit, 9 fits, 11 and 13 find no room (everything else is in the window)
    (band,) = cache.bands(0, {Precision.FULL: torch.tensor([5, 9, 11, 13])}, 2, take)
    assert fetched[-1] == [9, 11, 13]
    assert torch.equal(band.ids, torch.tensor([5, 9, 11, 13]))
    assert band.which is not None and band.which.tolist() == [0, 0, 1, 1]
    assert torch.equal(band.gather(), records_for(band.ids))  # in neuron-id order, whoever holds them
    assert cache.stats.hits == 1 and cache.stats.misses == 6
    assert len(cache.bands(0, {Precision.FULL: torch.tensor([5, 9])}, 3, take)) == 1 and fetched[-1] == [9, 11, 13]


def test_budget_split_respected():
    rb = {Precision.FULL: 300, Precision.INT8: 100, Precision.INT4: 50}
    cache = NeuronCache.with_budget(4, 1000, rb, budget_bytes=120_000, shares={Precision.FULL: 0.5, Precision.INT8: 0.3, Precision.INT4: 0.2}, window=2)
    assert cache.budget_bytes <= 120_000
    assert cache.slots(0, Precision.FULL).capacity == 30_000 * 0.5 // 300
    full = NeuronCache.with_budget(2, 10, rb, budget_bytes=10**9, shares={p: 1 / 3 for p in Precision}, window=1)
    assert all(full.slots(0, p).capacity == 10 for p in Precision)


def test_an_id_outside_the_layer_is_refused_and_changes_nothing():
    s = PrecisionSlots(num_neurons=10, record_bytes=4, capacity=4, window=1, device=torch.device("cpu"))
    before = s.last_used.clone()
    with pytest.raises((IndexError, neuron_cache.InvalidArgument)):
        s.lookup(torch.tensor([1, 10]), step=3)
    if neuron_cache._slots_library() is not None:  # the C lookup checks before it writes
        assert torch.equal(s.last_used, before)


def test_a_precision_without_room_tracks_nothing_and_every_id_misses():
    """A FULL-only policy's INT8/INT4 slots: no per-neuron arrays (they would cost
    16 bytes a neuron per layer), every band a miss computed from the fetch."""
    rb = {p: 8 for p in Precision}
    cache = NeuronCache(2, 1000, rb, {Precision.FULL: 4}, window=2)
    empty = cache.slots(0, Precision.INT8)
    assert empty.row_of.numel() == empty.last_used.numel() == empty.records.numel() == 0
    assert not empty.contains(torch.tensor([3, 4])).any()
    (band,) = cache.bands(1, {Precision.INT8: torch.tensor([3, 9])}, 1, lambda prec, ids: records_for(ids))
    assert torch.equal(band.gather(), records_for(torch.tensor([3, 9])))
    assert cache.stats.misses == 2 and cache.slots(1, Precision.INT8).num_used == 0
    with pytest.raises(neuron_cache.InvalidArgument, match="out of range"):
        empty.lookup(torch.tensor([1, 1000]), step=2)
