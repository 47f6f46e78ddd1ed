"""Helpers of the method tests (``from methods.kit import ...``): the registered methods, probes
and steps made by hand, seeded tensors and numpy references."""
from types import SimpleNamespace

import numpy as np
import torch

from kdbench.contracts import Outputs, Probe, Step
from kdbench.core import plugins

REG = plugins.registry().methods


def method(name):
    """The registered Method ``name``."""
    return REG[name].obj


def hp_of(name, **over):
    """The method's default hyperparameters, with ``over`` replaced."""
    return SimpleNamespace(**{**method(name).hparam_defaults(), **over})


def probe_of(name, s_shapes, t_shapes, num_classes=5, **over):
    """A Probe of per-sample tap shapes; every shape's tap is also offered by the network."""
    return Probe(hp_of(name, **over), num_classes, (1, 40), dict(s_shapes), dict(t_shapes),
                 list(s_shapes), list(t_shapes), lambda: None)


def step_of(name, s_feats=None, t_feats=None, z_s=None, z_t=None, y=None, modules=None,
            epoch=0, epochs=1, b=None, ncls=5, **over):
    """A main-stage Step of ``name``'s hyperparameters; logits and labels made up where not given."""
    b = b or (len(next(iter(s_feats.values()))) if s_feats else len(z_s))
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(b, ncls, generator=g, requires_grad=True) if z_s is None else z_s
    z_t = torch.randn(b, ncls, generator=g) if z_t is None else z_t
    y = torch.arange(b) % ncls if y is None else y
    return Step(x=torch.zeros(b, 1, 8), y=y, student=Outputs(z_s, s_feats or {}),
                teacher=Outputs(z_t, t_feats or {}), hp=hp_of(name, **over), modules=modules,
                epoch=epoch, epochs=epochs, stage="main")


def make_step(name, s_out, t_out, y, modules, stage="main", epoch=0, **over):
    """A Step of given Outputs (``t_out`` may be None) in ``stage`` of a 10-epoch run."""
    return Step(x=torch.zeros(len(y), 1), y=y, student=s_out, teacher=t_out, hp=hp_of(name, **over),
                modules=modules, epoch=epoch, epochs=10, stage=stage)


def step_from(s_logits, t_logits, y, hp, modules=None, teachers=None, x=None, s_feats=None, t_feats=None):
    """A main-stage Step of logits and a hyperparameter namespace (no teacher where t_logits is None)."""
    x = torch.zeros(len(y), 1, 40) if x is None else x
    teacher = None if t_logits is None else Outputs(t_logits, t_feats or {})
    return Step(x=x, y=y, student=Outputs(s_logits, s_feats or {}), teacher=teacher, hp=hp, modules=modules,
                epoch=0, epochs=1, stage="main", teachers=teachers)


def shapes(dims, c_s=4, c_t=6, s1=8, s2=4):
    """Per-sample tap shapes of a 2-stage student/teacher (stage1, stage2, pre taps, pool)."""
    def one(c):
        sp1, sp2 = (s1,) * dims, (s2,) * dims
        return {"stage1": (c, *sp1), "stage2": (c, *sp2), "stage1_pre": (c, *sp1), "stage2_pre": (c, *sp2),
                "pool": (c * s2 ** dims,)}
    return one(c_s), one(c_t)


def feats(shp, b, gen, grad=False):
    """Random features of the taps of :func:`shapes` (stage = relu(pre), pool = flattened stage2)."""
    out = {}
    for k in ("stage1", "stage2"):
        pre = torch.randn(b, *shp[k], generator=gen)
        out[k + "_pre"], out[k] = pre, pre.relu()
    out["pool"] = out["stage2"].flatten(1).clone()
    if grad:
        out = {k: v.requires_grad_() for k, v in out.items()}
    return out


def eval_identity_bn(bn_layer):
    bn_layer.eval()
    bn_layer.eps = 0.0  # running mean 0, var 1: the identity


def rnd(*shape, grad=True, seed=None):
    """A float32 tensor of seeded normal values (seed: the sum of the shape unless given)."""
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).float().requires_grad_(grad)


def npy(t):
    return t.detach().double().numpy()


def ce_np(z, y):
    z = npy(z)
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -np.mean([logp[i, y[i]] for i in range(len(y))])


def softmax_np(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_np(p_t, z_s):
    """Batch mean of KL(p_t ‖ softmax(z_s))."""
    log_p_s = np.log(softmax_np(z_s))
    return np.mean((p_t * (np.log(p_t) - log_p_s)).sum(1))


def pool_np(f, size):
    """Block-average pooling of [B, C, *sp] to spatial ``size`` (exact divisors only)."""
    f = npy(f)
    if f.ndim == 3:
        r = f.shape[2] // size[0]
        return f.reshape(*f.shape[:2], size[0], r).mean(3)
    r1, r2 = f.shape[2] // size[0], f.shape[3] // size[1]
    return f.reshape(*f.shape[:2], size[0], r1, size[1], r2).mean((3, 5))
