"""darkrank: soft and hard listwise losses against explicit permutation enumeration."""
import itertools
import math

import numpy as np
import pytest
import torch

from kdbench.contracts import Outputs
from kdbench.errors import KdbenchError
from kdbench_builtin.methods import darkrank

from methods.kit import hp_of, make_step, probe_of


def _pl(scores_in_order):
    lp = 0.0
    for j in range(len(scores_in_order)):
        lp += scores_in_order[j] - math.log(sum(math.exp(v) for v in scores_in_order[j:]))
    return lp


def _scores_np(f, scale, power):
    e = f / np.linalg.norm(f, axis=1, keepdims=True)
    return np.array([[-scale * np.linalg.norm(e[i] - e[j]) ** power for j in range(len(e))] for i in range(len(e))])


def test_darkrank_soft_and_hard_match_explicit_enumeration():
    g = torch.Generator().manual_seed(0)
    fs, ft_ = torch.randn(5, 6, generator=g).double(), torch.randn(5, 7, generator=g).double()
    S_s, S_t = _scores_np(fs.numpy(), 3.0, 3.0), _scores_np(ft_.numpy(), 3.0, 3.0)
    soft = hard = 0.0
    for q in range(5):
        others = sorted((j for j in range(5) if j != q), key=lambda j: -S_t[q, j])
        hard += -_pl([S_s[q, j] for j in others])
        top = others[:3]
        for perm in itertools.permutations(top):
            lt, ls = _pl([S_t[q, j] for j in perm]), _pl([S_s[q, j] for j in perm])
            soft += math.exp(lt) * (lt - ls)
    y = torch.zeros(5, dtype=torch.long)
    mk = lambda **o: make_step("darkrank", Outputs(torch.zeros(5, 5), {"pool": fs}), Outputs(torch.zeros(5, 5), {"pool": ft_}), y, None, **o)
    assert darkrank.rank_term(mk(variant="soft", top_k=3)).item() == pytest.approx(soft / 5, rel=1e-6)
    assert darkrank.rank_term(mk(variant="hard")).item() == pytest.approx(hard / 5, rel=1e-6)


def test_darkrank_zero_for_same_and_batch_of_one():
    f = torch.randn(4, 3, dtype=torch.double)
    y = torch.zeros(4, dtype=torch.long)
    same = make_step("darkrank", Outputs(None, {"pool": f}), Outputs(None, {"pool": f}), y, None)
    assert darkrank.rank_term(same).item() == pytest.approx(0.0, abs=1e-9)
    one = make_step("darkrank", Outputs(None, {"pool": f[:1]}), Outputs(None, {"pool": f[:1]}), y[:1], None)
    for variant in ("soft", "hard"):
        one.hp.variant = variant
        assert darkrank.rank_term(one).item() == 0.0


def test_darkrank_taps_skip_missing_pool_so_check_explains():
    assert darkrank.METHODS[0].taps(hp_of("darkrank"), ["stage1"], ["stage1", "pool"]) == []
    with pytest.raises(KdbenchError, match="pool"):
        darkrank.METHODS[0].check(probe_of("darkrank", {"pool": (4,)}, {}))
