"""shrink(module, example_inputs=...) on real architectures trained with the coupled group lasso."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightreg import CoupledGroupLasso, load_shrunk, save_shrunk, shrink
from lightreg.proximal.metric import LazySteps, step_rule
from tests import arch_models as am

pytest.importorskip("torch_pruning")


def train(model: nn.Module, inputs, alpha: float, steps: int = 30, seed: int = 0):
    """Adam with the coupled group prox after every step (the Regularizer's proximal mode, by hand)."""
    torch.manual_seed(seed)
    penalty = CoupledGroupLasso(alpha)
    roots = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    params = [p for _, p in penalty.bind(model, roots, example_inputs=inputs)]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        nn.functional.cross_entropy(logits, torch.arange(len(logits)) % logits.shape[1]).backward()
        opt.step()
        with torch.no_grad():
            stepped = [p for p in params if p.grad is not None]
            penalty.apply_prox_(stepped, LazySteps(step_rule(opt, opt.param_groups[0]), stepped))
    model.eval()
    return penalty


def image(n: int = 16, seed: int = 0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def tokens(n: int = 8, seed: int = 0):
    return {"input_ids": torch.randint(0, 40, (n, 6), generator=torch.Generator().manual_seed(seed))}


CASES = {
    "resnet": (am.ResNet, image, 0.01),
    "mobilenet": (am.MobileNet, image, 0.01),
    "encoder": (am.Encoder, lambda n=16, seed=0: torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(seed)), 0.002),
    "bert": (am.tiny_bert, tokens, 0.002),
}


#: The MobileNet block (depthwise conv, residual add) runs in the fast set; the others take several seconds each.
PARAMS = [pytest.param(name, marks=() if name == "mobilenet" else pytest.mark.slow) for name in CASES]


@pytest.fixture(scope="module", params=PARAMS)
def trained(request):
    if request.param == "bert":
        pytest.importorskip("transformers")
    build, data, alpha = CASES[request.param]
    torch.manual_seed(0)
    model = build()
    penalty = train(model, data(), alpha)
    small = shrink(model, data())
    return request.param, model, penalty, small, data


def outputs(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def test_some_groups_die_and_shrink_cuts_them_with_the_same_outputs(trained):
    name, model, penalty, small, data = trained
    alive = sum(int(f.alive().sum()) for f in penalty.groups.families)
    total = sum(f.units for f in penalty.groups.families)
    assert 0 < alive < total, (name, alive, total)
    fresh = data(seed=1)  # not the input the graph was traced with
    expected, got = outputs(model, fresh), outputs(small, fresh)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    report = small.shrink_report
    assert report.params_after == sum(p.numel() for p in small.parameters()) < report.params_before
    assert report.macs_after < report.macs_before and report.time_before > 0 and report.time_after > 0
    assert sum(r.removed for r in report.rows) == total - alive - sum(
        1 for f in penalty.groups.families if not f.alive().any())  # a group that died whole keeps one zero unit


def test_bert_heads_are_whole_groups(trained):
    name, model, penalty, small, _ = trained
    if name != "bert":
        pytest.skip("heads: the BERT case")
    heads = [f for f in penalty.groups.families if f.head]
    assert len(heads) == 2 and all(f.units == 4 and f.head == 4 for f in heads)
    names = {s.name.rsplit(".", 2)[-2] for s in heads[0].slices}
    assert names == {"query", "key", "value", "dense"}
    for layer, f in zip(small.bert.encoder.layer, heads, strict=True):
        kept = int(f.alive().sum()) or 1
        assert layer.attention.self.num_attention_heads == kept and layer.attention.self.query.out_features == 4 * kept


def test_save_and_load_without_pickle(trained, tmp_path):
    name, model, _, small, data = trained
    if name == "bert":
        pytest.skip("torch.export of a Hugging Face model: slow; the convolutional and encoder cases cover the format")
    save_shrunk(small, tmp_path / "small.pt2", data())
    loaded, report = load_shrunk(tmp_path / "small.pt2")
    fresh = data(n=5, seed=2)
    torch.testing.assert_close(loaded(fresh), outputs(small, fresh), rtol=1e-5, atol=1e-6)
    assert report["params_after"] == small.shrink_report.params_after
    with pytest.raises(Exception):  # the file is not a pickle: the unsafe loader cannot read it either
        torch.load(tmp_path / "small.pt2", weights_only=True)


def test_constant_channels_fold_where_exact():
    """Plain GroupLasso(dim=0) zeros: a zero filter with a bias is a constant channel. Into a Linear it folds
    (exactly); into a zero-padded conv only a constant 0 is cut, another constant stays and is counted."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    with torch.no_grad():
        net[3].running_mean.uniform_(-1, 1)
        net[0].weight[1:3] = 0.0
        net[0].bias[1], net[0].bias[2] = 0.5, -0.5  # relu: 0.5 stays before the padded conv, 0 goes
        net[2].weight[0] = 0.0  # a constant channel into the Linear: folded
    x = torch.randn(6, 1, 4, 4)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    small = shrink(net, x)
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())  # the original is untouched
    rows = {r.name: r for r in small.shrink_report.rows}
    assert small[0].out_channels == 3 and small[2].out_channels == 3 and rows["0"].kept == 1
    assert (rows["0"].removed, rows["2"].removed) == (1, 1)
    fresh = torch.randn(9, 1, 4, 4)
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-5, atol=1e-6)


def test_lightning_module_traces_from_its_example_input_array():
    pl = pytest.importorskip("lightning.pytorch")

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
            self.example_input_array = torch.zeros(3, 4)

        def forward(self, x):
            return self.net(x) + x[:, :2]  # not a Sequential: only the graph can follow it

    model = Model()
    with torch.no_grad():
        model.net[0].weight[:2] = 0.0
        model.net[0].bias[:2] = 0.0
        model.net[2].weight[:, :2] = 0.0
    small = shrink(model)
    assert small.net[0].out_features == 4
    x = torch.randn(5, 4)
    torch.testing.assert_close(small(x), model(x))


def test_sequential_reusing_a_module_is_refused():
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="'2' is the same module as '0'"):
        shrink(nn.Sequential(shared, nn.ReLU(), shared))


class _TiedHidden(nn.Module):
    """b and c hold one weight (c.weight = b.weight); cutting b's dead outputs would cut c differently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.c.weight = self.b.weight
        with torch.no_grad():
            self.b.weight[:6] = 0
            self.b.bias[:6] = 0

    def forward(self, x):
        return self.fc(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


class _TiedEmbedding(nn.Module):
    """A language-model-like net whose head is its embedding (head.weight = emb.weight); a dead hidden unit."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.up, self.down, self.head = nn.Embedding(10, 4), nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 10)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.up.weight[:2] = 0
            self.up.bias[:2] = 0

    def forward(self, tokens):
        return self.head(self.down(torch.relu(self.up(self.emb(tokens)))))


def test_a_weight_tied_between_layers_the_cut_would_split_is_refused_by_name():
    with pytest.raises(ValueError, match="tied between b.weight and c.weight"):
        shrink(_TiedHidden(), example_inputs=torch.randn(2, 4))


def test_an_embedding_tied_to_its_head_stays_tied_and_the_outputs_equal():
    net = _TiedEmbedding().eval()
    small = shrink(net, example_inputs=torch.randint(0, 10, (2, 5)))
    tokens = torch.randint(0, 10, (64, 5))  # more than the example: the check must hold off it too
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), net(tokens), rtol=1e-5, atol=1e-6)
    assert small.head.weight is small.emb.weight and small.up.out_features == 4
