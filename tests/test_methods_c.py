"""Tests of the methods-c plugins (dml, multi_teacher, datafree) and of combined methods: loss
values against independent computations, gradients never reaching a teacher."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.core import plugins
from kdbench.contracts import Outputs, Probe, Step
from kdbench.core.plan import RunConfig, make_plan
from kdbench_builtin.methods import datafree, dml, multi_teacher


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _step(s_logits, t_logits, y, hp, modules=None, teachers=None, x=None, s_feats=None, t_feats=None):
    x = torch.zeros(len(y), 1, 40) if x is None else x
    teacher = None if t_logits is None else Outputs(t_logits, t_feats or {})
    return Step(x, y, Outputs(s_logits, s_feats or {}), teacher, hp, modules, 0, 1, "main",
                teachers=teachers)


def _hp(module, **over):
    values = module.METHODS[0].hparam_defaults()
    values.update(over)
    return SimpleNamespace(**values)


# --------------------------------------------------------------------------- dml


class Fixed(nn.Module):
    """A 'peer' returning fixed logits plus a trainable bias."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.bias = nn.Parameter(torch.zeros(logits.shape[1]))

    def forward(self, x):
        return self.logits + self.bias


def _kl_np(p_t, z_s):
    log_p_s = np.log(_softmax(z_s))
    return np.mean((p_t * (np.log(p_t) - log_p_s)).sum(1))


@pytest.mark.parametrize("k", [2, 3])
def test_dml_loss_matches_numpy_and_each_peer_gets_only_its_own_gradient(k):
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(6, 5, generator=g) for _ in range(k)]
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    peers = dml.Peers([Fixed(z) for z in zs[1:]])
    student = zs[0].clone().requires_grad_()
    terms = dml.loss(_step(student, None, y, _hp(dml, peers=k), peers))
    zn = [z.numpy() for z in zs]
    ce = [np.mean(-np.log(_softmax(z)[np.arange(6), y.numpy()])) for z in zn]
    kl = [np.mean([_kl_np(_softmax(zn[j]), zn[i]) for j in range(k) if j != i]) for i in range(k)]
    assert terms["ce"].item() == pytest.approx(ce[0], rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl[0], rel=1e-5)
    assert terms["peers_ce"].item() == pytest.approx(sum(ce[1:]), rel=1e-5)
    assert terms["peers_kl"].item() == pytest.approx(sum(kl[1:]), rel=1e-5)
    # the other peers are detached: peer 0's KL sends no gradient into the peers
    terms["kl"].backward()
    assert all(p.bias.grad is None for p in peers.peers) and student.grad.abs().sum() > 0


def test_dml_builds_peers_from_new_student_each_different():
    made = iter(range(100))

    def new_student():
        torch.manual_seed(next(made))
        return nn.Linear(3, 2)

    probe = Probe(_hp(dml, peers=3), 2, (3,), {}, {}, [], [], new_student)
    mods = dml.build(probe)
    assert len(mods.peers) == 2
    assert not torch.equal(mods.peers[0].weight, mods.peers[1].weight)
    assert dml.METHODS[0].peers(mods) == list(mods.peers) and not dml.METHODS[0].needs_teacher


# --------------------------------------------------------------------------- multi_teacher


def test_multi_teacher_loss_matches_numpy_and_no_gradient_reaches_the_teachers():
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(4, 5, generator=g).requires_grad_()
    z_t = [torch.randn(4, 5, generator=g).requires_grad_() for _ in range(3)]
    y = torch.tensor([1, 0, 4, 2])
    hp = _hp(multi_teacher)
    assert (hp.T, hp.a, hp.b) == (20.0, 0.1, 0.9)
    terms = multi_teacher.loss(_step(z_s, z_t[0], y, hp, teachers=[Outputs(z) for z in z_t[1:]]))
    T = hp.T
    q = np.mean([_softmax(z.detach().numpy() / T) for z in z_t], 0)
    target = 0.1 * np.eye(5)[y.numpy()] + 0.9 * q
    log_p = np.log(_softmax(z_s.detach().numpy() / T))
    want = T * T * np.mean(-(target * log_p).sum(1))
    assert sum(terms.values()).item() == pytest.approx(want, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(T * T * 0.1 * np.mean(-log_p[np.arange(4), y.numpy()]), rel=1e-5)
    sum(terms.values()).backward()
    assert all(z.grad is None for z in z_t) and z_s.grad.abs().sum() > 0


def test_multi_teacher_with_one_teacher_uses_it_alone():
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.tensor([0, 1, 2])
    hp = _hp(multi_teacher, T=2.0)
    one = multi_teacher.loss(_step(z_s, z_t, y, hp))
    same = multi_teacher.loss(_step(z_s, z_t, y, hp, teachers=[Outputs(z_t.clone())]))
    assert sum(one.values()).item() == pytest.approx(sum(same.values()).item(), rel=1e-6)


# --------------------------------------------------------------------------- datafree


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
    hp = _hp(datafree, synth_count=30, synth_batch=20, synth_steps=3)
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
    terms = datafree.loss(_step(z_s, z_t, torch.zeros(4, dtype=torch.long), _hp(datafree)))
    assert list(terms) == ["kd"]
    T = 4.0
    want = T * T * _kl_np(_softmax(z_t.detach().numpy() / T), z_s.detach().numpy() / T)
    assert terms["kd"].item() == pytest.approx(want, rel=1e-5)
    terms["kd"].backward()
    assert z_t.grad is None


# --------------------------------------------------------------------------- combined methods


def test_combined_at_kd_namespaces_hparams_and_counts_ce_once():
    reg = plugins.registry()
    plan = make_plan(RunConfig(method="at+kd", hparams={"kd.alpha": "0.5", "at.beta": "10"}), reg)
    m = plan.method_obj
    assert m.name == "at+kd"
    assert {"at.beta", "at.p", "kd.alpha", "kd.T"} <= set(plan.hp)
    assert plan.hp["kd.alpha"] == 0.5 and plan.hp["at.beta"] == 10.0
    assert plan.params()["hp.kd.alpha"] == 0.5
    from kdbench.errors import KdbenchError

    with pytest.raises(KdbenchError, match="kd.alpha"):
        make_plan(RunConfig(method="at+kd", hparams={"alpha": "0.5"}), reg)
    with pytest.raises(KdbenchError):
        make_plan(RunConfig(method="at+nosuch"), reg)

    g = torch.Generator().manual_seed(4)
    s_f = {n: torch.randn(4, 3, 8, generator=g).requires_grad_() for n in ("stage1", "stage2")}
    t_f = {n: torch.randn(4, 3, 8, generator=g).requires_grad_() for n in ("stage1", "stage2")}
    s_f["pool"] = torch.randn(4, 6, generator=g)  # a tap another part would use: at must not see it
    z_s, z_t = torch.randn(4, 5, generator=g).requires_grad_(), torch.randn(4, 5, generator=g).requires_grad_()
    y = torch.tensor([0, 1, 2, 3])
    shapes = {"stage1": (3, 8), "stage2": (3, 8)}
    probe = Probe(SimpleNamespace(**plan.hp), 5, (1, 40), dict(shapes), dict(shapes),
                  ["stage1", "stage2", "pool"], ["stage1", "stage2", "pool"], lambda: None)
    m.check(probe)
    mods = m.build(probe)
    terms = m.loss(_step(z_s, z_t, y, SimpleNamespace(**plan.hp), mods, s_feats=s_f, t_feats=t_f))
    assert set(terms) == {"ce", "at", "kd"}
    from kdbench_builtin.methods import at, kd

    ce = F.cross_entropy(z_s, y)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)  # at's CE (weight 1); kd's (1 − α)·CE dropped
    want_at = 10.0 * at.at_term([s_f["stage1"], s_f["stage2"]], [t_f["stage1"], t_f["stage2"]], 2.0)
    assert terms["at"].item() == pytest.approx(want_at.item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.5 * kd.kd_term(z_s, z_t, 4.0).item(), rel=1e-6)
    sum(terms.values()).backward()
    assert z_t.grad is None and all(v.grad is None for v in t_f.values())
    assert z_s.grad.abs().sum() > 0 and s_f["stage1"].grad.abs().sum() > 0


def test_combined_method_keeps_modules_stages_and_data_of_its_parts():
    reg = plugins.registry()
    plan = make_plan(RunConfig(method="fitnets+dml"), reg)
    m = plan.method_obj
    assert m.peers is not None and m.stages is not None and m.needs_teacher
    stages = m.stages(SimpleNamespace(**plan.hp))
    assert stages and stages[0].name.startswith("fitnets.")
    assert make_plan(RunConfig(method="kd+datafree"), reg).method_obj.train_data is not None
