"""Penalties as plain tensor functions, against autograd of the explicit formulas and closed-form proxes."""


import pytest
import torch

from lightreg import L1, L2, ElasticNet, GroupLasso
import lightreg.penalties.elastic_net as elementwise
from tests.oracles import explicit_prox, explicit_value


@pytest.fixture(autouse=True)
def _float64(float64):
    """Exact comparisons (optimizer scalars such as ``step`` take the default dtype too)."""


PENALTIES = [L1(0.3), L2(0.7), ElasticNet(0.5, l1_ratio=0.3), ElasticNet(0.5, 1.0), ElasticNet(0.5, 0.0),
             GroupLasso(0.2, dim=0), GroupLasso(0.2, dim=1), GroupLasso(0.1, dim=-1)]


def weights(seed=0, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[0, 0] = 0.0  # a zero entry
    w[2] = 0.0  # an all-zero row (a zero group for dim=0)
    return w


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 2, 2)])
def test_value_and_gradient_match_autograd_of_the_formula(penalty, shape):
    """The value, its backpropagation (a loss + penalty(params)) and the in-place gradient, against autograd of R."""
    w = weights(shape=shape)
    if isinstance(penalty, GroupLasso) and penalty.dim == 1:
        w.select(1, 1).zero_()
    ws = [w.clone().requires_grad_(), (w + 1).clone().requires_grad_()]
    refs = [x.detach().clone().requires_grad_() for x in ws]
    ours = penalty(x for x in ws)  # any iterable of tensors, as model.parameters() is
    ref = sum(explicit_value(penalty, x) for x in refs)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)

    ours.backward()
    ref.backward()
    grads = [torch.zeros_like(x) for x in ws]
    penalty.apply_gradient_(grads, [x.detach() for x in ws])
    for g, x, r in zip(grads, ws, refs):
        # sqrt(sum g²) has no derivative at an all-zero group; the convention picks the subgradient 0.
        expected = r.grad.nan_to_num(nan=0.0)
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("lam", [1e-4, 0.3])
def test_keras_conversions_in_value_and_gradient(lam):
    """Keras defines ``L1(l1)`` as ``l1 * sum(|x|)`` and ``L2(l2)`` as ``l2 * sum(x²)`` (no ½; keras.regularizers):
    so Keras ``l1(λ)`` is ``L1(alpha=λ)`` and Keras ``l2(λ)`` is ``L2(alpha=2λ)``, in value and in gradient."""
    w = weights()
    w[1, 1] = -w[1, 1]  # both signs, and exact zeros (where |x| has the subgradient 0 in both)
    keras = {"l1": lambda x: lam * torch.sum(torch.abs(x)), "l2": lambda x: lam * torch.sum(torch.square(x))}
    for kind, ours in (("l1", L1(alpha=lam)), ("l2", L2(alpha=2 * lam))):
        x = w.clone().requires_grad_()
        keras[kind](x).backward()
        torch.testing.assert_close(ours(w), keras[kind](w), rtol=1e-14, atol=0)
        grad = torch.zeros_like(w)
        ours.apply_gradient_([grad], [w])
        torch.testing.assert_close(grad, x.grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_decoupled_step_is_w_minus_lr_times_gradient(penalty):
    w = weights().requires_grad_()
    explicit_value(penalty, w).backward()
    expected = w.detach() - 0.1 * w.grad.nan_to_num(nan=0.0)
    ours = weights()
    penalty.apply_decay_([ours], lr=0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
@pytest.mark.parametrize("lr", [0.05, 0.8, 10.0])
def test_prox_matches_closed_form(penalty, lr):
    w = weights()
    expected = explicit_prox(penalty, w, lr)
    ours = w.clone()
    penalty.apply_prox_([ours], lr)
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(ours == 0, expected == 0)  # exact zeros, not tiny numbers


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_prox_minimises_the_prox_objective(penalty):
    """prox_{tR}(w) = argmin_v R(v) + ||v - w||² / (2t): no nearby point does better."""
    w, t = weights(), 0.4
    v = w.clone()
    penalty.apply_prox_([v], t)

    def objective(x):
        return float(explicit_value(penalty, x) + ((x - w) ** 2).sum() / (2 * t))

    g = torch.Generator().manual_seed(1)
    best = objective(v)
    for _ in range(50):
        assert objective(v + 1e-3 * torch.randn(v.shape, generator=g)) >= best - 1e-12


def test_soft_threshold_zeroes_exactly_and_keeps_the_sign():
    w = torch.tensor([-2.0, -0.5, -0.1, 0.0, 0.1, 0.5, 2.0])
    L1(1.0).apply_prox_([w], 0.5)
    assert w.tolist() == [-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5]


def test_explicit_alpha_overrides_and_zero_alpha_is_a_no_op():
    w = weights()
    before = w.clone()
    L1(0.5).apply_prox_([w], 1.0, alpha=0.0)
    ElasticNet(0.5).apply_decay_([w], lr=1.0, alpha=0.0)
    assert torch.equal(w, before)
    assert torch.equal(L1(0.5)(w, alpha=1.0), L1(1.0)(w))


@pytest.mark.parametrize("penalty", [L1(0.3), L2(0.7)], ids=repr)
def test_foreach_path_equals_the_loop(monkeypatch, penalty):
    """The fused path (taken on accelerators) forced on CPU must give the per-tensor loop's result."""
    tensors = [torch.randn(shape) for shape in [(6, 5), (40, 3), (2, 2), (7,)]]
    loop = [t.clone() for t in tensors]
    fused = [t.clone() for t in tensors]
    penalty.apply_prox_(loop, 0.3)
    monkeypatch.setattr(elementwise, "use_foreach", lambda ts: True)
    penalty.apply_prox_(fused, 0.3)
    for a, b in zip(loop, fused):
        assert torch.equal(a, b)
    if isinstance(penalty, L2):
        g_loop, g_fused = [torch.ones_like(t) for t in tensors], [torch.ones_like(t) for t in tensors]
        penalty.apply_gradient_(g_fused, tensors)
        penalty.apply_decay_(fused, lr=0.3)
        monkeypatch.setattr(elementwise, "use_foreach", lambda ts: False)
        penalty.apply_gradient_(g_loop, tensors)
        penalty.apply_decay_(loop, lr=0.3)
        assert all(torch.equal(a, b) for a, b in zip(g_loop, g_fused))
        assert all(torch.equal(a, b) for a, b in zip(loop, fused))


def test_chunks_never_exceed_the_largest_tensor():
    tensors = [torch.empty(n) for n in (5, 3, 2, 9, 1, 1, 8)]
    runs = elementwise.chunk_by_numel(tensors)
    assert [i for r in runs for i in range(r.start, r.stop)] == list(range(len(tensors)))
    assert all(sum(t.numel() for t in tensors[r]) <= 9 for r in runs)


def test_repr_and_equality_show_the_parameters():
    assert repr(L1(0.001)) == "L1(alpha=0.001)"
    assert repr(ElasticNet(0.1, l1_ratio=0.25)) == "ElasticNet(alpha=0.1, l1_ratio=0.25)"
    assert repr(GroupLasso(2, dim=1)) == "GroupLasso(alpha=2.0, dim=1)"
    assert L2(0.1) == L2(0.1) and L2(0.1) != L1(0.1)


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: L1(-1.0), ValueError, "alpha"),
        (lambda: L2(float("nan")), ValueError, "alpha"),
        (lambda: L1(float("inf")), ValueError, "alpha"),
        (lambda: L1("0.1"), TypeError, "alpha"),
        (lambda: L1(True), TypeError, "alpha"),
        (lambda: ElasticNet(0.1, l1_ratio=1.5), ValueError, "l1_ratio"),
        (lambda: ElasticNet(0.1, l1_ratio=-0.1), ValueError, "l1_ratio"),
        (lambda: GroupLasso(0.1, dim=0.5), TypeError, "dim"),
        (lambda: GroupLasso(0.1, dim="rows"), TypeError, "dim"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


def test_group_lasso_dim_out_of_range_is_reported_with_the_shape():
    with pytest.raises(ValueError, match=r"dim=2 .*\(3, 4\)"):
        GroupLasso(0.1, dim=2).check_tensor("fc.weight", torch.zeros(3, 4))


def test_value_of_nothing_and_of_non_tensors_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        L1(0.1)([])
    with pytest.raises(TypeError, match="tensors"):
        L1(0.1)([1.0, 2.0])


@pytest.mark.parametrize("penalty", [L1(0.3), L2(0.7), ElasticNet(0.5, l1_ratio=0.3), ElasticNet(0.5, 0.0)], ids=repr)
def test_per_coordinate_prox_matches_the_closed_form_coordinate_by_coordinate(penalty):
    """With a tensor step the prox is the scalar prox of each coordinate at its own step."""
    w = weights()
    steps = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) * 2 + 0.01
    expected = w.clone()
    for idx in range(w.numel()):
        i, j = divmod(idx, w.shape[1])
        expected[i, j] = explicit_prox(penalty, w[i, j].reshape(1), float(steps[i, j]))[0]
    in_place = w.clone()
    penalty.prox_(in_place, steps, penalty.alpha)
    torch.testing.assert_close(in_place, expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(penalty.prox(w, steps, penalty.alpha), expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(in_place == 0, expected == 0)


@pytest.mark.parametrize("penalty", PENALTIES[:3], ids=repr)
def test_float16_value_is_accumulated_in_float32(penalty):
    """A float16 sum overflows at 65504; the value of a large float16 tensor stays finite and exact to float32."""
    w = torch.full((4000, 64), 3.0, dtype=torch.float16)
    expected = explicit_value(penalty, w.double())
    got = penalty(w)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


def test_group_lasso_zeroes_a_group_whose_norm_underflows():
    w = torch.full((3, 4), 1e-23, dtype=torch.float32)
    w[0] = 1.0
    GroupLasso(0.1, dim=0).prox_(w, 1.0, 0.1)
    assert torch.equal(w[1:], torch.zeros(2, 4)) and (w[0] > 0).all()
