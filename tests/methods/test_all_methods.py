"""What every built-in method with distillation terms must do, method by method: gradients reach the
student and the method's modules but never the teacher (on 1-D and 2-D features), the search space
samples only valid values, and a pair the method cannot serve is refused in one line."""
import optuna
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench.core import plugins
from kdbench.core.taps import expand
from kdbench.errors import KdbenchError

from methods.kit import feats, make_step, method, probe_of, rnd, shapes, step_of

# feature-based and logit-based methods (made-up tensors per tap)
A_NAMES = ["logits", "nst", "sp", "cc", "rkd", "pkt", "dkd", "dist", "kdsvd", "at", "at_grad"]
# methods with extra modules or pre-stages (features of a 2-stage network with pre-ReLU taps)
B_NAMES = sorted(["fitnets", "vid", "ab", "ft", "fsp", "crd", "reviewkd", "darkrank", "rocket", "adversarial"])
torch.manual_seed(0)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_declarations_load():
    reg = plugins.registry()
    assert not reg.failures
    assert set(A_NAMES + B_NAMES) <= set(reg.methods)


# --------------------------------------------------------------------------- gradients


def _feats(shape_kind, b, c, seed, grad):
    sizes = [(8,), (4,)] if shape_kind == "1d" else [(4, 4), (2, 2)]
    return {f"stage{i + 1}": rnd(b, c, *sz, seed=seed + i, grad=grad) for i, sz in enumerate(sizes)} | {
        "pool": rnd(b, c * 2, seed=seed + 9, grad=grad)
    }


@pytest.mark.parametrize("shape_kind", ["1d", "2d"])
@pytest.mark.parametrize("name", [n for n in A_NAMES if n != "at_grad"])
def test_gradients_reach_student_and_modules_not_teacher(name, shape_kind):
    b, k = 4, 5
    fs = _feats(shape_kind, b, 3, 0, True)
    ft = _feats(shape_kind, b, 6, 20, True)  # a wider teacher, spatially larger stage 1 on 2-D
    if shape_kind == "2d":
        ft["stage1"] = rnd(b, 6, 8, 8, seed=40)
    z_s, z_t = rnd(b, k, seed=50), rnd(b, k, seed=51)
    m = method(name)
    fs = {n: fs[n] for n in (expand(m.taps, list(fs)) if m.taps else [])}
    ft = {n: ft[n] for n in (expand(m.taps, list(ft)) if m.taps else [])}
    pr = probe_of(name, {n: tuple(v.shape[1:]) for n, v in fs.items()}, {n: tuple(v.shape[1:]) for n, v in ft.items()})
    if m.check:
        m.check(pr)
    mods = m.build(pr) if m.build else None
    st = step_of(name, fs, ft, z_s=z_s, z_t=z_t, modules=mods, ncls=k)
    terms = m.loss(st)
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    kd_terms = [n for n in terms if n != "ce"]
    assert kd_terms
    used = [v for v in list(fs.values()) + [z_s] if v.grad is not None and v.grad.abs().sum() > 0]
    assert used, f"{name}: no gradient reached the student"
    for v in list(ft.values()) + [z_t]:
        assert v.grad is None, f"{name}: gradient reached a teacher tensor"
    if mods is not None:
        for p in mods.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: module parameter without gradient"
    # the distillation terms alone (without CE) also reach the student
    fs2 = {n: v.detach().requires_grad_(True) for n, v in fs.items()}
    z_s2 = z_s.detach().requires_grad_(True)
    terms = m.loss(step_of(name, fs2, ft, z_s=z_s2, z_t=z_t, modules=mods, ncls=k))
    sum(terms[n] for n in kd_terms).backward()
    assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in list(fs2.values()) + [z_s2])


def _stage_losses(name, hpv):
    m = method(name)
    out = [(st.name, st.loss) for st in (m.stages(hpv) if m.stages else [])]
    return out + [("main", m.loss)]


MODULES_UNUSED = {("ab", "main"), ("fsp", "main")}  # pre-stage modules, idle later


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("name", B_NAMES)
def test_gradients_reach_student_and_modules_never_teacher(name, dims):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    s_shp, t_shp = shapes(dims)
    probe = probe_of(name, s_shp, t_shp)
    m = method(name)
    m.check(probe) if m.check else None
    modules = m.build(probe) if m.build else None
    for stage_name, loss_fn in _stage_losses(name, probe.hp):
        s_f, t_f = feats(s_shp, 6, gen, grad=True), feats(t_shp, 6, gen, grad=True)
        s_logits = torch.randn(6, 5, generator=gen).requires_grad_()
        t_logits = torch.randn(6, 5, generator=gen).requires_grad_()
        y = torch.tensor([0, 1, 2, 3, 4, 0])
        teacher = None if not m.needs_teacher else Outputs(t_logits, t_f)
        if modules is not None:
            modules.train()
            modules.zero_grad(set_to_none=True)
        terms = loss_fn(make_step(name, Outputs(s_logits, s_f), teacher, y, modules, stage=stage_name))
        total = sum(terms.values())
        assert torch.isfinite(total)
        total.backward()
        assert all(v.grad is None for v in [t_logits, *t_f.values()]), "gradient reached the teacher"
        student_grads = [v.grad for v in [s_logits, *s_f.values()] if v.grad is not None]
        trains_student = not any(st.name == stage_name and not st.train_student for st in (m.stages(probe.hp) if m.stages else []))
        if trains_student:
            assert any(g.abs().sum() > 0 for g in student_grads), f"{stage_name}: no gradient reached the student"
        if modules is not None:
            grads = [p.grad for p in modules.parameters() if p.grad is not None]
            if (name, stage_name) in MODULES_UNUSED:
                assert not grads, f"{stage_name}: the init-stage modules should be idle in the main stage"
            else:
                assert any(g.abs().sum() > 0 for g in grads), f"{stage_name}: no gradient reached the method's modules"


# --------------------------------------------------------------------------- search spaces and checks


@pytest.mark.parametrize("name", A_NAMES + B_NAMES)
def test_search_space_samples_only_valid_values(name):
    m = method(name)
    space = m.search_space()
    assert space, f"{name} has nothing to tune"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        for h in space:
            v = h.suggest(trial)
            assert h.check(v) == v
        return 0.0

    study.optimize(objective, n_trials=50)
    assert len(study.trials) == 50
    for h in m.hparams:
        h.check(h.default)
        assert h.low is not None or h.choices is not None or h.kind in (bool, str), f"{name}.{h.name} unbounded"
    assert m.citation and m.description


BAD_PAIRS = {
    "logits": lambda: probe_of("logits", {}, {}, num_classes=1),
    "dkd": lambda: probe_of("dkd", {}, {}, num_classes=2),
    "dist": lambda: probe_of("dist", {}, {}, num_classes=1),
    "nst": lambda: probe_of("nst", {"stage1": (3, 4), "stage2": (3, 2)}, {"stage1": (3, 4)}),
    "sp": lambda: probe_of("sp", {"pool": (4,)}, {"stage1": (3, 4)}),
    "kdsvd": lambda: probe_of("kdsvd", {"stage1": (3, 4)}, {"stage1": (3, 4)}),
    "cc": lambda: probe_of("cc", {"pool": (4,)}, {"stage1": (3, 4)}),
    "rkd": lambda: probe_of("rkd", {"stage1": (3, 4)}, {"pool": (4,)}),
    "pkt": lambda: probe_of("pkt", {"pool": (4,)}, {}),
    "at": lambda: probe_of("at", {"stage1": (3, 4), "stage2": (3, 2)}, {"stage1": (3, 4)}),
    "at_grad": lambda: probe_of("at_grad", {}, {}, num_classes=1),
    "fitnets": lambda: probe_of("fitnets", {"stage1": (4, 3)}, {"stage1": (4, 5)}),  # smaller, 3 vs 5: no integer ratio
    "vid": lambda: probe_of("vid", {"stage1": (4, 8)}, {"stage1": (4, 8), "stage2": (4, 4)}),
    "ab": lambda: probe_of("ab", {"stage1": (4, 8)}, {"stage1": (4, 8)}),  # no pre-ReLU taps
    "ft": lambda: probe_of("ft", {"pool": (4,)}, {"pool": (4,)}),
    "fsp": lambda: probe_of("fsp", *shapes(1), connector=False),  # 4 vs 6 channels
    "crd": lambda: probe_of("crd", {"stage1": (4, 8)}, {"pool": (4,)}),
    "reviewkd": lambda: probe_of("reviewkd", {"stage1": (4, 8)}, {"stage1": (4, 8), "stage2": (4, 4)}),
    "darkrank": lambda: probe_of("darkrank", {"stage1": (4, 8)}, {"stage1": (4, 8), "pool": (4,)}),
    "rocket": lambda: probe_of("rocket", {"stage1": (4, 8)}, {}, tap=3),
    "adversarial": lambda: probe_of("adversarial", {}, {}, num_classes=1),
}


@pytest.mark.parametrize("name", A_NAMES + B_NAMES)
def test_check_rejects_bad_pair_in_one_line(name):
    with pytest.raises(KdbenchError) as err:
        method(name).check(BAD_PAIRS[name]())
    assert "\n" not in str(err.value) and str(err.value)
