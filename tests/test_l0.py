"""L0: value = alpha * count of nonzeros; prox = hard threshold at sqrt(2 t alpha), per coordinate; proximal only."""

import math

import pytest
import torch

import lightreg
from lightreg import L0, L1, ElasticNet, GroupLasso


def _w(seed=0, shape=(6, 5)):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w[0, :2] = 0.0
    return w


def test_value_is_alpha_times_the_number_of_nonzeros():
    w = _w()
    assert L0(0.3)(w).item() == pytest.approx(0.3 * 28, rel=1e-15)
    assert L0(0.3)([w, torch.zeros(4, dtype=torch.float64)]).item() == pytest.approx(0.3 * 28, rel=1e-15)
    half = torch.ones(70000, dtype=torch.float16)  # a float16 count would overflow at 65504
    assert L0(1.0)(half).item() == 70000 and L0(1.0)(half).dtype == torch.float32
    assert "L0" in lightreg.__all__ and repr(L0(0.5)) == "L0(alpha=0.5)"


@pytest.mark.parametrize("tensor_step", [False, True])
def test_prox_is_the_hard_threshold_and_keeps_survivors_bit_for_bit(tensor_step):
    w, alpha = _w(1), 0.4
    t = torch.rand(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.05 if tensor_step else 0.7
    expected = w.clone()
    for idx, x in enumerate(w.reshape(-1).tolist()):
        ti = float(t.reshape(-1)[idx]) if tensor_step else t
        expected.view(-1)[idx] = x if abs(x) > math.sqrt(2 * ti * alpha) else 0.0
    got = L0(alpha).prox(w, t, alpha)
    assert torch.equal(got, expected) and not torch.equal(got, w)
    in_place = w.clone()
    L0(alpha).prox_(in_place, t, alpha)
    assert torch.equal(in_place, expected)


def test_prox_minimises_the_prox_objective_coordinate_by_coordinate():
    w, alpha = _w(3), 0.25
    t = torch.rand(w.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    v = L0(alpha).prox(w, t, alpha)

    def objective(x):
        return alpha * (x != 0) + (x - w) ** 2 / (2 * t)

    assert torch.all(objective(v) <= torch.minimum(objective(torch.zeros_like(w)), objective(w)))


def test_gradient_and_decoupled_step_refuse_with_a_clear_error():
    w = _w()
    for call in (lambda: L0(0.1).gradient(w, 0.1), lambda: L0(0.1).decay_(w, 0.1, 0.1),
                 lambda: L0(0.1).apply_gradient_([torch.zeros_like(w)], [w])):
        with pytest.raises(ValueError, match="mode='proximal'"):
            call()
    assert L0.proximal_only and not L1.proximal_only


@pytest.mark.parametrize("penalty", [L1(1.0), ElasticNet(1.0, 0.3), L0(1.0), GroupLasso(1.0, 0), GroupLasso(1.0, 1),
                                     GroupLasso(1.0, -1)], ids=repr)
@pytest.mark.parametrize("tensor_step", [False, True])
def test_zero_levels_tell_which_units_the_prox_zeroes_at_each_alpha(penalty, tensor_step):
    w = _w(5, (6, 5, 2)) if isinstance(penalty, GroupLasso) else _w(5)
    t = torch.rand(w.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.05 if tensor_step else 0.3
    levels = penalty.zero_levels(w, t)
    dim = getattr(penalty, "dim", None)
    groups = w.shape[dim] if dim is not None else w.numel()
    assert levels.shape == (groups,) and (levels >= 0).all()
    cuts = levels.unique()
    for alpha in ((cuts[1:] + cuts[:-1]) / 2).tolist():  # between levels: no ties with the boundary
        v = penalty.prox(w, t, alpha)
        if dim is None:
            zero = (v == 0).reshape(-1)
        else:
            zero = torch.stack([torch.all(v.select(dim, i) == 0) for i in range(groups)])
        assert torch.equal(zero, levels <= alpha), alpha


def test_penalties_without_zeros_have_no_levels():
    with pytest.raises(NotImplementedError, match="no exact zeros"):
        lightreg.L2(1.0).zero_levels(_w(), 0.1)
    with pytest.raises(NotImplementedError, match="no exact zeros"):
        ElasticNet(1.0, 0.0).zero_levels(_w(), 0.1)
