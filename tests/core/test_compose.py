"""Combined methods (kdbench.core.compose): each part gets its own hyperparameters, taps and
modules; teachers reach every part detached."""
from types import SimpleNamespace

import torch
from torch import nn

from kdbench.contracts import HParam, Method, Outputs, Probe, Step
from kdbench.core.compose import PartModules, PartTaps, combine_methods

TAPS = ["stem", "stage1", "stage2", "pool"]


def _recording(name: str, seen: dict, **fields) -> Method:
    """A method whose loss records what it was given and returns one term named after it."""
    def loss(step):
        seen[name] = step
        return {name: step.student.logits.sum() * step.hp.w}

    def build(probe):
        seen[f"{name}.probe"] = probe
        return nn.Linear(2, 2)

    return Method(name, loss, hparams=(HParam("w", 1.0, low=0.0, space=(0.1, 2.0)),), build=build, **fields)


def _probe(hp: dict) -> Probe:
    shapes = {"stem": (4, 40), "stage1": (8, 20), "stage2": (16, 10), "pool": (16,)}
    return Probe(SimpleNamespace(**hp), 10, (1, 40), dict(shapes), dict(shapes), list(TAPS), list(TAPS),
                 lambda: None)


def _step(hp: dict, modules) -> Step:
    g = torch.Generator().manual_seed(0)
    feats = lambda: {n: torch.randn(3, 2, generator=g, requires_grad=True) for n in TAPS}  # noqa: E731
    student = Outputs(torch.randn(3, 10, generator=g, requires_grad=True), feats())
    teacher = Outputs(torch.randn(3, 10, generator=g, requires_grad=True), feats())
    extra = Outputs(torch.randn(3, 10, generator=g, requires_grad=True), feats())
    return Step(x=torch.zeros(3, 1, 40), y=torch.zeros(3, dtype=torch.long), student=student, teacher=teacher,
                hp=SimpleNamespace(**hp), modules=modules, epoch=0, epochs=1, stage="main", teachers=[extra])


def test_each_parts_loss_sees_only_its_own_taps_hyperparameters_and_modules():
    seen: dict = {}
    first = _recording("a", seen, taps=("stage?",))
    second = _recording("b", seen, taps=lambda hp, s, t: ["pool"])  # a callable selection
    combined = combine_methods([first, second])
    hp = {"a.w": 2.0, "b.w": 3.0}
    assert [h.name for h in combined.hparams] == ["a.w", "b.w"]
    # the combined taps are the union, in part order
    assert combined.taps(SimpleNamespace(**hp), TAPS, TAPS) == ["stage1", "stage2", "pool"]
    modules = combined.build(_probe(hp))
    assert isinstance(modules, PartModules) and list(modules) == ["a", "b"]
    assert modules.part_taps == {"a": PartTaps(frozenset({"stage1", "stage2"}), frozenset({"stage1", "stage2"})),
                                 "b": PartTaps(frozenset({"pool"}), frozenset({"pool"}))}
    assert set(seen["a.probe"].student_shapes) == {"stage1", "stage2"} and seen["a.probe"].hp.w == 2.0
    assert set(seen["b.probe"].teacher_shapes) == {"pool"} and seen["b.probe"].hp.w == 3.0

    step = _step(hp, modules)
    terms = combined.loss(step)
    assert set(terms) == {"a", "b"}
    for name, wanted in (("a", {"stage1", "stage2"}), ("b", {"pool"})):
        part = seen[name]
        assert set(part.student.feats) == set(part.teacher.feats) == set(part.teachers[0].feats) == wanted
        assert part.modules is modules[name] and part.hp.w == hp[f"{name}.w"]
        assert all(part.student.feats[k] is step.student.feats[k] for k in wanted)  # the student keeps its graph
        frozen = [part.teacher.logits, *part.teacher.feats.values(), part.teachers[0].logits]
        assert all(not t.requires_grad for t in frozen)  # teachers reach each part detached
    sum(terms.values()).backward()
    assert step.teacher.logits.grad is None and step.student.logits.grad is not None


def test_without_part_modules_the_features_pass_unfiltered():
    seen: dict = {}
    combined = combine_methods([_recording("a", seen, taps=("stage1",)), _recording("b", seen, taps=("pool",))])
    hp = {"a.w": 1.0, "b.w": 1.0}
    combined.loss(_step(hp, None))
    assert set(seen["a"].student.feats) == set(TAPS) and seen["a"].modules is None
    combined.loss(_step(hp, nn.ModuleDict({"b": nn.Linear(2, 2)})))  # not built by the combination
    assert set(seen["b"].teacher.feats) == set(TAPS) and isinstance(seen["b"].modules, nn.Linear)
    assert seen["a"].modules is None
