"""Integer-only exponential / softmax against torch.exp."""
from __future__ import annotations

import pytest
import torch

from models.ptq.int_ops import IEXP_MAX_ABS_ERROR, IEXP_MAX_REL_ERROR, IExpConstants, int_exp, int_softmax


@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.05, 0.16, 0.3, 0.7, 2.0])
def test_int_exp_within_stated_bounds(scale):
    x_int = -torch.arange(0, int(25 / scale) + 1, dtype=torch.float32)
    constants = IExpConstants.from_scale(scale)
    exp_int = int_exp(x_int.clone(), constants)
    assert torch.equal(exp_int, exp_int.floor()) and (exp_int >= 0).all()  # integers
    # int32 holds every intermediate (the polynomial is the largest).
    assert (constants.b_int + constants.ln2_int) ** 2 + constants.c_int < 2**31
    approx = exp_int * constants.exp_scale
    ref = torch.exp(x_int.double() * scale)
    assert (approx - ref).abs().max().item() <= IEXP_MAX_ABS_ERROR
    big = ref >= 2.0**-12
    assert ((approx / ref - 1).abs()[big]).max().item() <= IEXP_MAX_REL_ERROR


def test_int_exp_is_monotone():
    x_int = -torch.arange(0, 200, dtype=torch.float32)
    exp_int = int_exp(x_int, IExpConstants.from_scale(0.1))
    assert (exp_int[:-1] >= exp_int[1:]).all()


def test_int_softmax_close_to_float_softmax():
    torch.manual_seed(0)
    s = 0.12
    x = torch.round(torch.randn(2, 3, 50, 50) * 4 / s) * s  # scores on an integer grid
    p = int_softmax(x, s)
    assert torch.allclose(p.sum(-1), torch.ones(2, 3, 50), atol=1e-5)
    assert (p - x.softmax(-1)).abs().max().item() < 0.005
