"""Radix selection of the k-th smallest value over several tensors, against torch.kthvalue of their concatenation."""

import math

import pytest
import torch

from lightreg.proximal.kth_value import kth_smallest, level_for_fraction


def _parts(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(s, generator=g, dtype=torch.float64).abs().to(dtype) for s in [(40, 30), (7,), (3, 5, 2)]]
    parts[0][:5] = 0.0
    parts[0][5, :4] = -0.0  # counts as zero
    parts[1][:3] = parts[2].reshape(-1)[0]  # ties across tensors
    parts[2].reshape(-1)[1] = torch.finfo(dtype).tiny / 4  # a subnormal
    parts[2].reshape(-1)[2] = math.inf
    return parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rank_matches_kthvalue_of_the_concatenation(dtype):
    parts = _parts(dtype)
    flat = torch.cat([p.reshape(-1) for p in parts]).abs()
    for k in [1, 2, 5, 6, 50, 400, 601, 900, len(flat) - 1, len(flat)]:
        expected = flat.kthvalue(k).values.item()
        assert kth_smallest(lambda: [p.clone() for p in parts], k, dtype) == expected, k


def test_float64_values_that_agree_in_their_first_32_bits_are_told_apart():
    base = torch.tensor([1.0], dtype=torch.float64)
    close = [base, torch.nextafter(base, torch.tensor([2.0], dtype=torch.float64)), base * 3]
    assert kth_smallest(lambda: [c.clone() for c in close], 2, torch.float64) == close[1].item()


def test_level_for_fraction_leaves_round_fraction_n_values_at_or_below_it():
    parts = _parts(torch.float32, seed=1)
    flat = torch.cat([p.reshape(-1) for p in parts]).abs()
    for fraction in [0.1, 0.5, 0.9, 0.95, 0.999]:
        alpha = level_for_fraction(lambda: [p.clone() for p in parts], fraction)
        k = math.floor(fraction * len(flat) + 0.5)
        assert (flat <= alpha).sum() >= k and (flat < flat.kthvalue(k).values).sum() < k
        assert alpha == torch.nextafter(flat.kthvalue(k).values, torch.tensor(math.inf)).item()
    assert level_for_fraction(lambda: [p.clone() for p in parts], 1e-6) == 0.0


def test_bad_rank_is_an_error_naming_it():
    with pytest.raises(ValueError, match="k must be in"):
        kth_smallest(lambda: [torch.ones(3)], 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kth_smallest(lambda: [torch.ones(3)], 0)
