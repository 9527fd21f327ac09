"""The engine's lean model (channels-last, batch norms folded): the same function, undone afterwards,
and never applied where folding could change what the model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkit.attacks.engine.lean import foldable_pairs, lean_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    """conv+bn blocks in a Sequential (the shape of robustkit's CNNs), with trained-looking stats."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _init(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)))


def _init(net: nn.Module) -> nn.Module:
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _state(net: nn.Module) -> dict:
    return {k: (v.clone(), v.stride(), v.data_ptr()) for k, v in net.state_dict().items()}


def test_same_function_and_gradient_and_everything_restored():
    net, x = _net(), torch.rand(5, 3, 16, 16)
    before = _state(net)
    modules = list(net)
    want = net(x)
    xg = x.clone().requires_grad_(True)
    want_grad = torch.autograd.grad(net(xg).logsumexp(1).sum(), [xg])[0]
    assert len(foldable_pairs(net)) == 2
    with lean_model(net, x) as xl:
        assert xl.is_contiguous(memory_format=torch.channels_last)
        assert isinstance(net[1], nn.Identity) and net[0].bias is not None
        got = net(xl)
        xg = xl.clone().requires_grad_(True)
        got_grad = torch.autograd.grad(net(xg).logsumexp(1).sum(), [xg])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    after = _state(net)
    assert list(net) == modules and net[0].bias is None and "0.bias" not in net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k][0], after[k][0]) and before[k][1:] == after[k][1:], k
    assert all(p.grad is None for p in net.parameters())


def test_restored_even_when_the_stage_fails():
    net, x = _net(), torch.rand(2, 3, 16, 16)
    before = _state(net)
    with pytest.raises(RuntimeError, match="boom"), lean_model(net, x):
        raise RuntimeError("boom")
    assert {k: v[0] for k, v in _state(net).items()}.keys() == before.keys()
    assert all(torch.equal(_state(net)[k][0], before[k][0]) for k in before)


def test_nothing_folded_where_it_could_change_the_function():
    net = _net()
    net[0].register_forward_hook(lambda m, i, o: None)  # a hook reads the conv's own output
    assert len(foldable_pairs(net)) == 1
    training = _net().train()
    assert foldable_pairs(training) == []
    shared = _net()
    twice = nn.Sequential(shared, nn.Sequential(shared[0], nn.ReLU()))  # the first conv used twice
    assert [p[2] for p in foldable_pairs(twice)] == [shared[3]]

    class Custom(nn.Sequential):  # a subclass may not run its modules in order
        def forward(self, x):
            return self[0](x)

    assert foldable_pairs(Custom(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval())) == []


def test_left_alone_off_cpu_shapes():
    net, flat = _net(), torch.rand(4, 10)
    with lean_model(net, flat) as out:
        assert out is flat and isinstance(net[1], nn.BatchNorm2d)
