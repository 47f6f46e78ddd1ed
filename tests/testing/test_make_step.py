"""kdbench.testing.make_step: a Step for a loss's own unit tests."""
import pytest
import torch

from kdbench.contracts import HParam, Method
from kdbench.errors import KdbenchError
from kdbench.testing import make_step


def test_a_registered_method_gets_its_defaults_and_a_trainable_student(env):
    step = make_step("kd", hp={"T": 2}, batch=4, num_classes=5)
    assert step.hp.T == 2.0 and step.hp.alpha == make_step("kd").hp.alpha
    assert step.student.logits.shape == (4, 5) and step.y.shape == (4,) and int(step.y.max()) < 5
    assert step.x.shape == (4, 1, 40) and step.index.tolist() == [0, 1, 2, 3]
    assert step.student.logits.requires_grad and not step.teacher.logits.requires_grad
    from kdbench.core import plugins

    terms = plugins.registry().method("kd").loss(step)
    sum(terms.values()).backward()
    assert step.student.logits.grad is not None and step.student.logits.grad.abs().sum() > 0
    # the KD term alone vanishes when the student copies the teacher
    same = make_step("kd", hp={"alpha": 1.0}, seed=3)
    with torch.no_grad():
        same.student.logits.copy_(same.teacher.logits)
    assert float(plugins.registry().method("kd").loss(same)["kd"].detach()) == pytest.approx(0.0, abs=1e-6)


def test_features_teachers_and_determinism():
    method = Method(name="feat", loss=lambda step: {}, hparams=(HParam("w", 1.0, low=0.0),))
    step = make_step(method, feats={"stage1": (8, 20)}, teacher_feats={"stage1": (16, 20)}, teachers=2,
                     batch=3, input_shape=(3, 32, 32), epoch=2, epochs=5, stage="hint")
    assert step.hp.w == 1.0 and (step.epoch, step.epochs, step.stage) == (2, 5, "hint")
    assert step.student.feats["stage1"].shape == (3, 8, 20) and step.student.feats["stage1"].requires_grad
    assert step.teacher.feats["stage1"].shape == (3, 16, 20)
    assert len(step.teachers) == 2 and step.teachers[1].feats["stage1"].shape == (3, 16, 20)
    assert step.x.shape == (3, 3, 32, 32)
    again = make_step(method, feats={"stage1": (8, 20)}, teacher_feats={"stage1": (16, 20)}, teachers=2,
                      batch=3, input_shape=(3, 32, 32))
    assert torch.equal(step.student.logits, again.student.logits) and torch.equal(step.y, again.y)
    assert not torch.equal(step.x, make_step(method, batch=3, input_shape=(3, 32, 32), seed=1).x)
    bare = make_step(hp={"anything": 3}, teacher=False)
    assert bare.teacher is None and bare.teachers is None and bare.hp.anything == 3


def test_hyperparameters_are_checked_against_the_declaration():
    method = Method(name="feat", loss=lambda step: {}, hparams=(HParam("w", 1.0, low=0.0),))
    with pytest.raises(KdbenchError, match="method 'feat' has no hyperparameter 'v'"):
        make_step(method, hp={"v": 1})
    with pytest.raises(KdbenchError, match="w"):
        make_step(method, hp={"w": -1.0})
