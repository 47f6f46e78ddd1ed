"""Combined methods (``a+b``): namespaced hyperparameters, CE counted once, each part's terms,
modules, stages and data kept; gradients never reach a teacher."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Probe
from kdbench.core import plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.errors import KdbenchError
from kdbench.losses import kd_term
from kdbench_builtin.methods import at

from methods.kit import step_from


def test_combined_at_kd_namespaces_hparams_and_counts_ce_once():
    reg = plugins.registry()
    plan = make_plan(RunConfig(method="at+kd", hparams={"kd.alpha": "0.5", "at.beta": "10"}), reg)
    m = plan.method_obj
    assert m.name == "at+kd"
    assert {"at.beta", "at.p", "kd.alpha", "kd.T"} <= set(plan.hp)
    assert plan.hp["kd.alpha"] == 0.5 and plan.hp["at.beta"] == 10.0
    assert plan.params()["hp.kd.alpha"] == 0.5
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
    terms = m.loss(step_from(z_s, z_t, y, SimpleNamespace(**plan.hp), mods, s_feats=s_f, t_feats=t_f))
    assert set(terms) == {"ce", "at", "kd"}
    ce = F.cross_entropy(z_s, y)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)  # at's CE (weight 1); kd's (1 − α)·CE dropped
    # at's p as at alone gets it on this (the embedded) data
    want_at = 10.0 * at.at_term([s_f["stage1"], s_f["stage2"]], [t_f["stage1"], t_f["stage2"]], plan.hp["at.p"])
    assert terms["at"].item() == pytest.approx(want_at.item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.5 * kd_term(z_s, z_t, 4.0).item(), rel=1e-6)
    sum(terms.values()).backward()
    assert z_t.grad is None and all(v.grad is None for v in t_f.values())
    assert z_s.grad.abs().sum() > 0 and s_f["stage1"].grad.abs().sum() > 0


@pytest.mark.parametrize("dataset, teacher, student", [("mnist1d", None, None),
                                                       ("cifar100", "resnet56", "resnet20"),
                                                       ("cifar100", "vgg13", "vgg8")])
def test_each_part_of_a_combination_gets_the_defaults_it_gets_alone(dataset, teacher, student):
    """Per-dataset and per-pair defaults (``Method.defaults_for``: at's and dkd's tuned embedded
    values, dkd's per-pair beta on CIFAR-100) reach each part; a value set explicitly still wins."""
    reg = plugins.registry()

    def plan(method, **hp):
        return make_plan(RunConfig(method=method, dataset=dataset, teacher=teacher, student=student, hparams=hp), reg)

    combined, alone = plan("at+dkd"), {name: plan(name) for name in ("at", "dkd")}
    for name, single in alone.items():
        assert {f"{name}.{key}": value for key, value in single.hp.items()} == {
            key: value for key, value in combined.hp.items() if key.startswith(name + ".")}
    assert plan("at+dkd", **{"dkd.beta": "1.5"}).hp["dkd.beta"] == 1.5
    sources = [s for s in (alone["at"].hp_source, alone["dkd"].hp_source) if s != "defaults"]
    assert sources and all(s.split("defaults + ", 1)[1] in combined.hp_source for s in sources)


def test_combined_method_keeps_modules_stages_and_data_of_its_parts():
    reg = plugins.registry()
    plan = make_plan(RunConfig(method="fitnets+dml", hparams={"fitnets.variant": "paper"}), reg)  # the hint stage
    m = plan.method_obj
    assert m.peers is not None and m.stages is not None and m.needs_teacher
    stages = m.stages(SimpleNamespace(**plan.hp))
    assert stages and stages[0].name.startswith("fitnets.")
    assert make_plan(RunConfig(method="kd+datafree"), reg).method_obj.train_data is not None
