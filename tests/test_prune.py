"""Pruning at conversion (convert/prune.py): exact per-vector sparsity, magnitude
and Wanda orderings, and clear errors for bad options (API and CLI)."""
from __future__ import annotations

import math

import pytest
import torch

from checkpoints import corpus
from m2cache import cli
from m2cache.convert.prune import PruneSpec, prune_vectors
from m2cache.errors import InvalidArgument

CALIB = "tinystories/valid_000-499_calib.txt"


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_every_vector_gets_exactly_its_share_of_zeros(sparsity):
    vectors = torch.randn(17, 3, 50).half()
    pruned = prune_vectors(vectors, sparsity)
    k = math.floor(sparsity * 50)
    assert ((pruned == 0).sum(dim=-1) == k).all()
    kept = pruned != 0
    assert torch.equal(pruned[kept], vectors[kept]) and pruned.dtype == torch.float16


def test_magnitude_keeps_the_largest_and_wanda_weighs_by_input_norm():
    w = torch.tensor([[[1.0, -4.0, 2.0, -3.0]] * 2])  # [1, 2, 4]: one input row, one output column
    assert prune_vectors(w, 0.5)[0, 0].tolist() == [0.0, -4.0, 0.0, -3.0]
    norm = torch.tensor([10.0, 1.0, 10.0, 1.0])  # features 0 and 2 see large inputs
    wanda = prune_vectors(w, 0.5, norm)
    assert wanda[0, 0].tolist() == [1.0, 0.0, 2.0, 0.0]  # |W| * ||X||: 10, 4, 20, 3
    assert wanda[0, 1].tolist() == [0.0, -4.0, 0.0, -3.0]  # the output column: magnitude


@pytest.mark.parametrize("kwargs,fragment", [
    ({"sparsity": 1.0}, "[0, 1)"),
    ({"sparsity": -0.1}, "[0, 1)"),
    ({"sparsity": float("nan")}, "[0, 1)"),
    ({"sparsity": 0.5, "method": "wanda"}, "--text"),
    ({"sparsity": 0.5, "method": "sparsegpt"}, "magnitude, wanda"),
    ({"sparsity": 0.5, "method": "wanda", "text": "/no/such/file.txt"}, "not a readable file"),
])
def test_bad_prune_options_are_refused(kwargs, fragment):
    with pytest.raises(InvalidArgument) as info:
        PruneSpec(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("extra,fragment", [
    (["--prune", "1.5"], "must be in [0, 1)"),
    (["--prune", "0.5", "--prune-method", "wanda"], "needs calibration text"),
    (["--prune-method", "wanda", "--text", "x.txt"], "only apply with --prune"),
])
def test_cli_refuses_bad_prune_options_and_writes_nothing(tmp_path, capsys, extra, fragment):
    hf = corpus(CALIB).parents[2] / "models" / "stories260k"
    rc = cli.main(["convert", str(hf), str(tmp_path / "out"), "--no-progress", *extra])
    assert rc == 2 and fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
