"""Band assignment, ratio validation and the ratio-search candidate grid (no model needed)."""
import pytest
import torch

from m2cache.codec.format import Precision, RecordLayout
from m2cache.errors import InvalidArgument
from m2cache.predictors.bands import BandRatios, assign_bands, row_percentiles
from m2cache.predictors.search import candidates

LAYOUT = RecordLayout(d_model=64, nvec=3, has_bias=False, dtype="float16", int4_group=32)


def _ids(bands):
    return [set(t.tolist()) for t in (bands.full_ids, bands.int8_ids, bands.int4_ids)]


@pytest.mark.parametrize("ratios", [BandRatios(0.1, 0.2, 0.3), BandRatios(0.25, 0.0, 0.0), BandRatios(0.0, 0.5, 0.5),
                                    BandRatios(1.0, 0.0, 0.0), BandRatios(0.333, 0.333, 0.334)])
def test_bands_are_disjoint_sized_and_ordered(ratios):
    scores = torch.randn(172, generator=torch.Generator().manual_seed(1))
    bands = assign_bands(scores, ratios)
    full, int8, int4 = _ids(bands)
    assert not (full & int8) and not (full & int4) and not (int8 & int4)
    assert (len(full), len(int8), len(int4)) == ratios.counts(172)
    assert abs(bands.num_kept - ratios.kept * 172) <= 1
    # Every FULL neuron outscores every INT8 one, which outscores every INT4 one and every skipped one.
    kept = full | int8 | int4
    skipped = set(range(172)) - kept
    for hi, lo in ((full, int8 | int4 | skipped), (int8, int4 | skipped), (int4, skipped)):
        if hi and lo:
            assert min(scores[list(hi)]) > max(scores[list(lo)])


def test_byte_budget_is_respected():
    ratios = BandRatios(0.1, 0.3, 0.4)
    bands = assign_bands(torch.randn(1000), ratios)
    budget = ratios.byte_fraction(LAYOUT) * 1000 * LAYOUT.num_bytes(Precision.FULL)
    # Cumulative rounding: at most one neuron's FULL record over the exact budget.
    assert bands.num_bytes(LAYOUT) <= budget + LAYOUT.num_bytes(Precision.FULL)


def test_batch_of_one_row_equals_single_row():
    scores = torch.randn(1, 96)
    ratios = BandRatios(0.2, 0.2, 0.2)
    assert _ids(assign_bands(scores, ratios)) == _ids(assign_bands(scores[0], ratios))


def test_batch_union_keeps_each_rows_best_neurons_and_the_budget():
    # Two rows whose top neurons differ: row 0 favours 0..9, row 1 favours 10..19.
    scores = torch.zeros(2, 100)
    scores[0, :10] = torch.arange(10, 0, -1).float() + 100
    scores[1, 10:20] = torch.arange(10, 0, -1).float() + 100
    scores += torch.rand(2, 100) * 0.01
    ratios = BandRatios(0.1, 0.1, 0.0)
    bands = assign_bands(scores, ratios)
    full, int8, _ = _ids(bands)
    assert (len(full), len(int8)) == (10, 10)  # same size as one row's bands
    assert full == set(range(5)) | set(range(10, 15))  # each row's top half gets FULL
    assert int8 == set(range(5, 10)) | set(range(15, 20))


def test_row_percentiles_rank_within_rows():
    pct = row_percentiles(torch.tensor([[3.0, 1.0, 2.0], [10.0, 30.0, 20.0]]))
    assert torch.allclose(pct, torch.tensor([[1.0, 1 / 3, 2 / 3], [1 / 3, 1.0, 2 / 3]]))


@pytest.mark.parametrize("bad", [(0.5, 0.4, 0.2), (-0.1, 0.2, 0.2), (0.2, float("nan"), 0.1), (1.5, 0.0, 0.0)])
def test_bad_ratios_are_rejected(bad):
    with pytest.raises(InvalidArgument):
        BandRatios(*bad)


def test_bad_scores_are_rejected():
    with pytest.raises(InvalidArgument):
        assign_bands(torch.randn(2, 3, 4), BandRatios(0.1, 0.1, 0.1))


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.9])
def test_search_candidates_fit_the_budget(budget):
    cands = candidates(budget, LAYOUT, 172, step=0.1)
    assert len(cands) >= 2
    for r in cands:
        assert r.kept <= 1 + 1e-9
        assert r.byte_fraction(LAYOUT) <= budget + 1e-9
    # Some candidate spends (nearly) the whole budget.
    assert max(r.byte_fraction(LAYOUT) for r in cands) >= budget - 0.01


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_search_rejects_bad_budget(budget):
    with pytest.raises(InvalidArgument):
        candidates(budget, LAYOUT, 172)


def _score_rows(trial: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(trial)
    if trial % 3 == 0:  # many exact ties
        return torch.randint(0, 5, (n,), generator=g).float()
    s = torch.randn(n, generator=g)
    if trial % 5 == 0:
        s[torch.randint(0, n, (3,), generator=g)] = float("nan")
    if trial % 7 == 0:
        s = -s.abs()
    return s


@pytest.mark.parametrize("trial", range(40))
def test_c_band_selection_equals_the_torch_selection(trial):
    """The decode path's C selection (select_bands.c) hands out the same bands as the
    torch top-k path: the same ids where scores are distinct, the same score multisets
    where exact ties straddle a band edge; ids ascending; NaN ranks first."""
    from m2cache.model import kernels
    from m2cache.predictors.bands import _bands_of_one_row

    assert kernels._library("select_bands") is not None, "the C selection kernel did not build here"
    n = [1, 2, 31, 172, 1536, 5632][trial % 6]
    s = _score_rows(trial, n)
    g = torch.Generator().manual_seed(100 + trial)
    a, b, c = sorted(torch.rand(3, generator=g).tolist())
    ratios = BandRatios(a, b - a, c - b) if trial % 4 else BandRatios(0.0, 0.0, 1.0)
    fast = _bands_of_one_row(s, ratios)
    with kernels.torch_only():
        ref = _bands_of_one_row(s, ratios)
    for got, want in zip(fast.as_choice().values(), ref.as_choice().values()):
        assert got.dtype == torch.long and got.numel() == want.numel()
        assert bool((got[1:] > got[:-1]).all())
        if trial % 3 and trial % 5:
            assert torch.equal(got, want)
        else:
            key = lambda ids: torch.nan_to_num(s[ids], nan=float("inf")).sort().values  # noqa: E731
            assert torch.equal(key(got), key(want))
