"""fsp: FSP matrices against loops, the init/main split of RepDistiller, connectors only where
channels differ, the pair checks, and the CIFAR resnet32x4 → resnet8x4 init stage staying finite."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs, Probe
from kdbench.core.plugins import load as load_plugins
from kdbench.core.taps import Tapped
from kdbench.errors import KdbenchError
from kdbench_builtin.methods import fsp

from methods.kit import feats, hp_of, make_step, probe_of, shapes


def test_fsp_single_stage_rejected_and_matching_channels_accepted():
    with pytest.raises(KdbenchError):
        fsp.check(probe_of("fsp", {"stage1": (4, 8)}, {"stage1": (4, 8)}))
    fsp.check(probe_of("fsp", *shapes(1, c_s=4, c_t=4), connector=False))
    assert fsp.build(probe_of("fsp", *shapes(1, c_s=4, c_t=4))) is None  # channels match: no connector
    with pytest.raises(KdbenchError, match="equal channels"):
        fsp.check(probe_of("fsp", *shapes(1, c_s=4, c_t=6), connector=False))


def _gram_loop(f1, f2):
    b, c1, n = f1.shape
    c2 = f2.shape[1]
    out = np.zeros((b, c1, c2))
    for i in range(b):
        for p in range(c1):
            for q in range(c2):
                out[i, p, q] = sum(f1[i, p, x] * f2[i, q, x] for x in range(n)) / n
    return out


@pytest.mark.parametrize("dims", [1, 2])
def test_fsp_matrix_with_pooling_matches_loop(dims):
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 3, *(8,) * dims, generator=g)
    f2 = torch.randn(2, 4, *(4,) * dims, generator=g)
    f1_np = f1.numpy()
    pooled = f1_np.reshape(2, 3, 4, 2).mean(-1) if dims == 1 else f1_np.reshape(2, 3, 4, 2, 4, 2).mean((3, 5))
    want = _gram_loop(pooled.reshape(2, 3, -1), f2.numpy().reshape(2, 4, -1))
    assert fsp.fsp_matrix(f1, f2).numpy() == pytest.approx(want, rel=1e-5, abs=1e-6)


def _with_stem(f, gen):
    """``feats`` of :func:`shapes` plus a stem map [B, C, 8, 8] (2-D)."""
    c = f["stage1"].shape[1]
    return {"stem": torch.randn(len(f["stage1"]), c, 8, 8, generator=gen).relu(), **f}


def test_init_stage_is_the_unweighted_sum_over_stem_and_stages_like_repdistiller():
    # RepDistiller helper/pretrain.py: loss = sum(FSP(feat_s[:-1], feat_t[:-1])) — [stem, s1, s2, s3]
    # pairs, no weight; distiller_zoo/FSP.py: fsp = mean over positions of bot·top, MSE per pair
    s_shp, t_shp = shapes(2, c_s=4, c_t=4)
    g = torch.Generator().manual_seed(0)
    s_f, t_f = _with_stem(feats(s_shp, 3, g), g), _with_stem(feats(t_shp, 3, g), g)
    y = torch.zeros(3, dtype=torch.long)
    got = fsp.init_loss(make_step("fsp", Outputs(None, s_f), Outputs(None, t_f), y, None, stage="init"))["fsp"]

    def grams(f):
        n = lambda t: t.numpy().reshape(3, 4, -1)  # noqa: E731
        s1 = F.avg_pool2d(f["stage1"], 1).numpy()  # stem and stage1 are both 8x8
        return [_gram_loop(n(f["stem"]), s1.reshape(3, 4, -1)),
                _gram_loop(F.avg_pool2d(f["stage1"], 2).numpy().reshape(3, 4, -1), n(f["stage2"]))]

    want = sum(np.mean((a - b) ** 2) for a, b in zip(grams(s_f), grams(t_f)))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the main stage is CE alone by default (RepDistiller: loss_kd = 0 for fsp), beta adds the sum
    z = torch.randn(3, 5)
    main = fsp.loss(make_step("fsp", Outputs(z, s_f), Outputs(torch.randn(3, 5), t_f), y, None))
    assert set(main) == {"ce"} and main["ce"].item() == pytest.approx(F.cross_entropy(z, y).item())
    main = fsp.loss(make_step("fsp", Outputs(z, s_f), Outputs(torch.randn(3, 5), t_f), y, None, beta=2.0))
    assert main["fsp"].item() == pytest.approx(2 * want, rel=1e-5)


@pytest.mark.parametrize("dims", [1, 2])
def test_connector_only_where_channels_differ(dims):
    s_shp, t_shp = shapes(dims, c_s=4, c_t=6)
    conns = fsp.build(probe_of("fsp", s_shp, t_shp))
    assert sorted(conns) == ["stage1", "stage2"] and [c.out_channels for c in conns.values()] == [6, 6]
    mixed = dict(s_shp, stage1=(6, *s_shp["stage1"][1:]))  # stage1 matches the teacher, stage2 does not
    assert sorted(fsp.build(probe_of("fsp", mixed, t_shp))) == ["stage2"]
    g = torch.Generator().manual_seed(0)
    s_f, t_f = feats(s_shp, 3, g), feats(t_shp, 3, g)
    y = torch.zeros(3, dtype=torch.long)
    got = fsp.init_loss(make_step("fsp", Outputs(None, s_f), Outputs(None, t_f), y, conns, stage="init"))["fsp"]
    mapped = {k: conns[k](s_f[k]) for k in ("stage1", "stage2")}
    want = F.mse_loss(fsp.fsp_matrix(mapped["stage1"], mapped["stage2"]),
                      fsp.fsp_matrix(t_f["stage1"], t_f["stage2"]))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def _cifar_init_losses(old: bool, steps: int) -> list[float]:
    """The FSP init stage on resnet32x4 → resnet8x4 (random weights), 192 synthetic CIFAR-shaped
    samples, SGD at the reference lr 0.05 (momentum 0.9, wd 5e-4), batch 64. ``old``: kdbench's
    former form (50 × the sum over stage1..3, trainable connectors on every stage)."""
    reg = load_plugins()
    torch.manual_seed(0)

    def tapped(name, wanted):
        model = reg.model(name)
        net = model.make(100, (3, 32, 32))
        return Tapped(net, model.taps_of(net), wanted, name)

    wanted = ["stage1", "stage2", "stage3"] if old else ["stem", "stage1", "stage2", "stage3"]
    student, teacher = tapped("resnet8x4", wanted), tapped("resnet32x4", wanted).eval().requires_grad_(False)
    with torch.no_grad():
        s_shp = {k: tuple(v.shape[1:]) for k, v in student(torch.zeros(2, 3, 32, 32)).feats.items()}
        t_shp = {k: tuple(v.shape[1:]) for k, v in teacher(torch.zeros(2, 3, 32, 32)).feats.items()}
    hp = hp_of("fsp")
    if old:
        conns = torch.nn.ModuleDict({k: torch.nn.Conv2d(s_shp[k][0], t_shp[k][0], 1, bias=False) for k in wanted})
    else:
        conns = fsp.build(Probe(hp, 100, (3, 32, 32), s_shp, t_shp, wanted, wanted, lambda: None))
        assert conns is None  # same channels on every map: no connector
    params = list(student.parameters()) + (list(conns.parameters()) if conns is not None else [])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (192,), generator=g)
    student.train()
    with torch.no_grad():  # the frozen teacher's outputs for the three batches, once
        t_outs = [teacher(x[b * 64:(b + 1) * 64]) for b in range(3)]
    out = []
    for i in range(steps):
        xb, yb = x[i % 3 * 64:(i % 3 + 1) * 64], y[i % 3 * 64:(i % 3 + 1) * 64]
        step = make_step("fsp", student(xb), t_outs[i % 3], yb, conns, stage="init")
        value = 50 * fsp.fsp_term(step) if old else fsp.init_loss(step)["fsp"]
        opt.zero_grad()
        value.backward()
        opt.step()
        out.append(value.item())
    return out


def test_cifar_resnet32x4_to_resnet8x4_init_stage_stays_finite():
    # the former form diverged here (as in full runs on CPU and GPU): 1e24 by the third batch, then NaN
    old = _cifar_init_losses(old=True, steps=4)
    assert not np.isfinite(old[-1]) or old[-1] > 1e12
    new = _cifar_init_losses(old=False, steps=6)
    assert np.all(np.isfinite(new)) and new[-1] < new[0]


def test_shufflenetv1_students_get_a_smaller_init_weight_other_pairs_the_reference_one():
    from kdbench.core.plan import RunConfig, make_plan

    reg = load_plugins()
    shuffle = make_plan(RunConfig(method="fsp", dataset="cifar100", teacher="resnet32x4", student="shufflenetv1"), reg)
    assert shuffle.hp["init_weight"] == 0.1 and "ShuffleNetV1" in shuffle.hp_source
    same = make_plan(RunConfig(method="fsp", dataset="cifar100", teacher="resnet32x4", student="resnet8x4"), reg)
    assert same.hp["init_weight"] == 1.0
