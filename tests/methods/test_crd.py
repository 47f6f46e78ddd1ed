"""crd: in-batch and memory-bank InfoNCE against numpy, the momentum update, self-negatives masked."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.contracts import Outputs
from kdbench_builtin.methods import crd

from methods.kit import make_step, probe_of


def _nce_np(a, keys, tau):
    logits = a @ keys.T / tau
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -np.mean(logp[np.arange(len(a)), np.arange(len(a))])


def _crd_identity(d, k, n=0):
    probe = probe_of("crd", {"pool": (d,)}, {"pool": (d,)}, feat_dim=d, nce_k=k)
    probe.num_train = n
    mods = crd.build(probe)
    for lin in (mods.embed_s, mods.embed_t):
        lin.weight.data.copy_(torch.eye(d))
        lin.bias.data.zero_()
    return mods


def test_crd_without_index_is_in_batch_info_nce():
    g = torch.Generator().manual_seed(0)
    mods = _crd_identity(4, 8)
    nrm = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    s1, t1 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.zeros(3, dtype=torch.long)
    step = make_step("crd", Outputs(torch.zeros(3, 5), {"pool": s1}), Outputs(torch.zeros(3, 5), {"pool": t1}), y, mods)
    es1, et1 = nrm(s1.numpy()), nrm(t1.numpy())
    assert crd.crd_term(step).item() == pytest.approx(_nce_np(es1, et1, 0.07) + _nce_np(et1, es1, 0.07), rel=1e-5)


def _bank_nce_np(a, mem, idx, neg, tau):
    out = []
    for i in range(len(a)):
        keys = [mem[idx[i]]] + [mem[j] for j in neg if j != idx[i]]
        logits = np.array(keys) @ a[i] / tau
        logits -= logits.max()
        out.append(-(logits[0] - np.log(np.exp(logits).sum())))
    return np.mean(out)


def test_crd_memory_bank_nce_and_momentum_update_match_numpy():
    d, n = 4, 10
    mods = _crd_identity(d, 16384, n)
    assert mods.memory_s.shape == (n, d) and "memory_t" in mods.state_dict()
    g = torch.Generator().manual_seed(2)
    s1, t1 = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
    index = torch.tensor([7, 2, 5])
    mem_s, mem_t = mods.memory_s.clone().numpy(), mods.memory_t.clone().numpy()
    torch.manual_seed(5)
    neg = mods.negatives(torch.device("cpu"))
    assert neg.shape == (n - 1,) and int(neg.min()) >= 0 and int(neg.max()) < n  # nce_k clamped to n − 1
    torch.manual_seed(5)  # the same draw inside crd_term
    step = make_step("crd", Outputs(torch.zeros(3, 5), {"pool": s1}), Outputs(torch.zeros(3, 5), {"pool": t1}),
                     torch.zeros(3, dtype=torch.long), mods)
    step.index = index
    value = crd.crd_term(step).item()
    nrm = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
    es, et = nrm(s1.numpy()), nrm(t1.numpy())
    idx, negs = index.numpy(), neg.numpy()
    want = _bank_nce_np(es, mem_t, idx, negs, 0.07) + _bank_nce_np(et, mem_s, idx, negs, 0.07)
    assert value == pytest.approx(want, rel=1e-5)
    # momentum 0.5 update of the batch's rows only, renormalised
    np.testing.assert_allclose(mods.memory_s[index].numpy(), nrm(0.5 * mem_s[idx] + 0.5 * es), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mods.memory_t[index].numpy(), nrm(0.5 * mem_t[idx] + 0.5 * et), rtol=1e-5, atol=1e-6)
    others = [i for i in range(n) if i not in idx]
    np.testing.assert_array_equal(mods.memory_t[others].numpy(), mem_t[others])


def test_crd_anchor_never_meets_itself_as_a_negative():
    mods = _crd_identity(4, 64, 3)
    x = torch.randn(1, 4)
    step = make_step("crd", Outputs(torch.zeros(1, 5), {"pool": x}), Outputs(torch.zeros(1, 5), {"pool": x}),
                     torch.zeros(1, dtype=torch.long), mods)
    step.index = torch.tensor([1])
    mods.memory_s[:] = 0
    mods.memory_t[:] = 0
    mods.memory_s[1] = F.normalize(x, dim=1)[0]
    mods.memory_t[1] = F.normalize(x, dim=1)[0]
    torch.manual_seed(0)  # 2 negatives from rows {0, 1, 2}; own row masked, others give logit 0
    neg = mods.negatives(torch.device("cpu"))
    k = int((neg != 1).sum())
    tau = 0.5  # a temperature at which the value is well above float32 rounding
    step.hp.tau = tau
    torch.manual_seed(0)
    mods.memory_s[1] = mods.memory_t[1] = F.normalize(x, dim=1)[0]
    v = crd.crd_term(step).item()
    want = 2 * -(1 / tau - np.log(np.exp(1 / tau) + k))
    assert v == pytest.approx(want, rel=1e-5)
