"""datafree: the BN-statistics loss, the synthesis and its cache, the KD-only loss."""
import pytest
import torch
from torch import nn

from kdbench.contracts import Probe
from kdbench_builtin.methods import datafree

from methods.kit import hp_of, kl_np, softmax_np, step_from


def _bn_teacher():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Conv1d(8, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 40, 10))
    # metadata as a trained teacher carries it: running statistics of data unlike N(0, 1) noise
    for bn in datafree.bn_layers(net):
        bn.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(4):
            signal = torch.sin(torch.linspace(0, 6, 40) + 6 * torch.rand(256, 1, 1)) * 2 + 1
            net(signal)
    return net.eval().requires_grad_(False)


def test_bn_statistics_loss_matches_direct_computation():
    net = _bn_teacher()
    x = torch.randn(16, 1, 40)
    stats = datafree.BNStats(datafree.bn_layers(net))
    net(x)
    stats.remove()
    bn1, bn2 = datafree.bn_layers(net)
    h1 = net[0](x)
    h2 = net[3](net[2](net[1](h1)))
    want = 0.0
    for h, bn in ((h1, bn1), (h2, bn2)):
        mean, var = h.mean((0, 2)), h.var((0, 2), unbiased=False)
        want += (mean - bn.running_mean).norm() + (var - bn.running_var).norm()
    assert stats.loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_synthesis_approaches_the_teachers_running_statistics_and_leaves_it_untouched():
    net = _bn_teacher()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    history = []
    targets = torch.arange(64) % 10
    x = datafree.synthesize_batch(net, targets, (1, 40), 60, 0.1, 1.0, 0.0, torch.Generator().manual_seed(0), history)
    assert x.shape == (64, 1, 40) and not x.requires_grad
    assert history[-1] < 0.25 * history[0]  # the BN-statistics loss goes down
    assert (net(x).argmax(1) == targets).float().mean() > 0.9  # and the teacher sees the sampled classes
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # running stats unchanged
    assert all(p.grad is None for p in net.parameters())


def test_datafree_synthesize_caches_and_refuses_teachers_without_batchnorm(tmp_path, monkeypatch):
    from kdbench.errors import KdbenchError

    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path))
    hp = hp_of("datafree", synth_count=30, synth_batch=20, synth_steps=3)
    probe = Probe(hp, 10, (1, 40), {}, {}, [], [], lambda: None)
    net = _bn_teacher()
    x, y = datafree.synthesize(probe, net, torch.device("cpu"))
    assert x.shape == (30, 1, 40) and sorted(set(y.tolist())) == list(range(10))
    assert len(list((tmp_path / "datafree").glob("*.pt"))) == 1
    x2, y2 = datafree.synthesize(probe, net, torch.device("cpu"))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(KdbenchError, match="BatchNorm"):
        datafree.synthesize(probe, nn.Linear(40, 10), torch.device("cpu"))


def test_datafree_loss_is_kd_on_teacher_outputs_only():
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(4, 10, generator=g).requires_grad_(), torch.randn(4, 10, generator=g).requires_grad_()
    terms = datafree.loss(step_from(z_s, z_t, torch.zeros(4, dtype=torch.long), hp_of("datafree")))
    assert list(terms) == ["kd"]
    T = 4.0
    want = T * T * kl_np(softmax_np(z_t.detach().numpy() / T), z_s.detach().numpy() / T)
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)
    terms["kd"].backward()
    assert z_t.grad is None
