"""at_grad: gradient-based attention transfer, Zagoruyko & Komodakis 2017, section 3.2.

The attention of a network is the gradient of its loss w.r.t. the input, J = ∂L(W, x)/∂x, with
L the summed cross-entropy (so J[i] is sample i's own gradient, independent of the batch size).
loss = ce_weight·CE + β/2 · mean_i ‖J_s[i] − J_t[i]‖²₂. The student's J is taken with
create_graph=True (the term is a double-backward through the student); the teacher's without a
graph, w.r.t. the input only, so the teacher gets no gradient. Not implemented: the paper's
optional flip-invariance term.

It needs the two *networks* in the loss (to re-run them on an input that requires grad): it reads
``step.student_net`` and ``step.teacher_net`` (anything mapping x to logits or to ``Outputs``).

Defaults and settings against the reference code: docs/FIDELITY.md.
"""
import dataclasses

import torch
import torch.nn.functional as F

from kdbench.contracts import Defaults, HParam, Method, Step
from kdbench.errors import KdbenchError
from kdbench.losses import ce, ce_weight, check_classes

NET_FIELDS = ("student_net", "teacher_net")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def input_grad(net, x, y, create_graph):
    """∂(Σ_i CE(net(x)_i, y_i))/∂x."""
    x = x.detach().float().requires_grad_(True)
    with torch.enable_grad():
        total = F.cross_entropy(_logits(net(x)).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(total, x, create_graph=create_graph)
    return g


def grad_at_term(student_net, teacher_net, x, y):
    j_s = input_grad(student_net, x, y, create_graph=True)
    j_t = input_grad(teacher_net, x, y, create_graph=False).detach()
    return (j_s - j_t).pow(2).flatten(1).sum(1).mean() / 2


def loss(step):
    nets = [getattr(step, n, None) for n in NET_FIELDS]
    if any(n is None for n in nets):
        raise KdbenchError("at_grad needs step.student_net and step.teacher_net, which this engine does not pass")
    return {"ce": ce(step), "at_grad": step.hp.beta * grad_at_term(*nets, step.x, step.y)}


def check(probe, step_fields=None):
    have = step_fields if step_fields is not None else {f.name for f in dataclasses.fields(Step)}
    missing = [n for n in NET_FIELDS if n not in have]
    if missing:
        raise KdbenchError(
            f"at_grad needs the networks in the loss, but Step has no {', '.join(missing)} (contract v1)"
        )
    check_classes(probe, "at_grad")  # for its cross-entropy gradients


#: Defaults on the embedded MNIST-1D data, where the CIFAR values above hurt (1-D maps of length
#: 20, 10 classes): the best trial of `kdbench tune --method at_grad --trials 20` on the mnist1d
#: validation split (cnn1d_4x32 → cnn1d_2x16), rounded; retrained, test top-1 over seeds 0-2:
#: 91.87 ± 1.01 % (77.33 ± 0.40 at the defaults).
EMBEDDED = Defaults({"beta": 0.011}, dataset="mnist1d",
                    source="kdbench tune on the mnist1d validation split (20 trials)")


METHODS = [
    Method(
        name="at_grad",
        loss=loss,
        description="gradient-based attention transfer: match input gradients of the losses",
        citation="Zagoruyko & Komodakis, ICLR 2017",
        check=check,
        defaults_for=(EMBEDDED,),
        hparams=(
            HParam("beta", 1.0, "weight of the input-gradient term (β; the loss is β/2·‖J_s − J_t‖²)", low=0.0,
                   space=(0.01, 100.0), log=True),
            ce_weight(),
        ),
    )
]
