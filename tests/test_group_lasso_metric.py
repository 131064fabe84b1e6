"""GroupLasso's prox with a per-coordinate step: argmin_v R(v) + Σ_i (v_i - u_i)² / (2 t_i).

Oracles: the optimality conditions of that problem written out (KKT), and a brute-force solve of the
same problem by many proximal-gradient iterations in the Euclidean metric (whose group prox is the
closed form), in float64.
"""

import math

import pytest
import torch

from lightreg import GroupLasso


def _problem(shape=(7, 6), dim=0, spread=6.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** torch.empty(shape, dtype=torch.float64).uniform_(-2, 1, generator=g)
    u.select(dim, 1).zero_()  # an all-zero group
    t = 1e-2 * 10 ** -torch.empty(shape, dtype=torch.float64).uniform_(0, spread, generator=g)
    # alpha where about half of the groups die: between the middle values of the zero test's ratio
    # ||u_g/t_g|| / sqrt(|g|), so no group sits on the boundary
    others = [d for d in range(u.ndim) if d != dim % u.ndim]
    ratio = torch.linalg.vector_norm(u / t, dim=others) if others else (u / t).abs()
    middle = ratio.sort().values[len(ratio) // 2 - 1 : len(ratio) // 2 + 1]
    alpha = float(middle.mean()) / math.sqrt(u.numel() / u.shape[dim])
    return u.to(dtype), t.to(dtype), alpha


def _groups(x, dim):
    return [x.select(dim % x.ndim, i) for i in range(x.shape[dim % x.ndim])]


CASES = [((7, 6), 0), ((7, 6), 1), ((5, 3, 2, 2), 0), ((5, 3, 2, 2), 1), ((9,), 0), ((4, 6), -1)]


@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("spread", [0.0, 3.0, 8.0])
def test_metric_prox_satisfies_the_optimality_conditions(shape, dim, spread):
    u, t, alpha = _problem(shape, dim, spread)
    penalty = GroupLasso(alpha, dim=dim)
    v = penalty.prox(u, t, alpha)
    lam = alpha * math.sqrt(u.numel() / u.shape[dim])
    zeros = nonzeros = 0
    for ug, tg, vg in zip(_groups(u, dim), _groups(t, dim), _groups(v, dim)):
        if torch.all(vg == 0):
            zeros += 1
            assert torch.linalg.vector_norm(ug / tg) <= lam * (1 + 1e-12)
        else:
            nonzeros += 1
            assert torch.linalg.vector_norm(ug / tg) > lam
            residual = (vg - ug) / tg + lam * vg / torch.linalg.vector_norm(vg)
            scale = torch.linalg.vector_norm(ug / tg)
            assert torch.linalg.vector_norm(residual) <= 1e-10 * scale, (spread, residual)
    assert zeros and nonzeros


def _brute_force(u, t, lam, dim, iters=3000):
    """Proximal gradient on Σ (v - u)²/(2t) + λ Σ_g ||v_g||, step 1/L with L = max 1/t: Euclidean group prox."""
    v, step = u.clone(), float(t.min())
    others = [d for d in range(u.ndim) if d != dim % u.ndim]
    for _ in range(iters):
        z = v - step * (v - u) / t
        norm = torch.linalg.vector_norm(z, dim=others, keepdim=True)
        v = z * (1 - step * lam / norm).clamp(min=0).nan_to_num(0.0)
    return v


@pytest.mark.parametrize("shape,dim", CASES[:4])
def test_metric_prox_matches_a_brute_force_solve(shape, dim):
    u, t, alpha = _problem(shape, dim, spread=1.5, seed=1)
    lam = alpha * math.sqrt(u.numel() / u.shape[dim])
    expected = _brute_force(u, t, lam, dim)
    got = GroupLasso(alpha, dim=dim).prox(u, t, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(got == 0, expected == 0)


@pytest.mark.parametrize("dim", [0, 1])
def test_uniform_tensor_step_equals_the_float_step(dim):
    u, _, alpha = _problem((7, 6), dim)
    t = torch.full_like(u, 0.03)
    torch.testing.assert_close(GroupLasso(alpha, dim).prox(u, t, alpha), GroupLasso(alpha, dim).prox(u, 0.03, alpha),
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_low_precision_agrees_with_float64(dtype, rtol):
    u, t, alpha = _problem((7, 6), 0, spread=4.0, seed=2)
    expected = GroupLasso(alpha, 0).prox(u, t, alpha)
    w = u.to(dtype)
    GroupLasso(alpha, 0).prox_(w, t.to(dtype), alpha)
    assert w.dtype == dtype and torch.isfinite(w).all()
    torch.testing.assert_close(w.double(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_prox_leaves_its_input_alone_and_prox_in_place_writes_the_same():
    u, t, alpha = _problem((7, 6), 1)
    before = u.clone()
    out = GroupLasso(alpha, 1).prox(u, t, alpha)
    assert torch.equal(u, before)
    GroupLasso(alpha, 1).prox_(u, t, alpha)
    assert torch.equal(u, out)
