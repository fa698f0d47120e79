"""The integer program's arithmetic against independent float64 / exact rational references, within the
bounds each module's docstring states."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.integer.dyadic import fixed_point, requantize
from models.integer.gelu import LOW, GeluTable
from models.integer.isqrt import bit_length, isqrt
from models.integer.layernorm import IntLayerNorm
from models.integer.matmul import linear_int, matmul_int
from models.integer.softmax import IEXP_MAX_ABS_ERROR, IEXP_MAX_REL_ERROR, LOG2_MAX_ERROR, IExp, IntSoftmax, log2_fixed


# -- integer square root -------------------------------------------------------------------------------
def test_isqrt_is_exact_on_every_integer_below_2_to_the_20():
    d = torch.arange(0, 1 << 20, dtype=torch.int64)
    assert torch.equal(isqrt(d), torch.tensor([math.isqrt(v) for v in range(1 << 20)]))


def test_isqrt_is_exact_up_to_2_to_the_62_and_around_squares():
    rng = random.Random(0)
    values = [rng.randrange(0, 1 << 62) for _ in range(20000)]
    values += [k * k + o for k in (rng.randrange(1, 1 << 31) for _ in range(5000)) for o in (-1, 0, 1)]
    values += [(1 << 62) - 1, 1 << 61, 1, 0, 2, 3, 4]
    t = torch.tensor(values, dtype=torch.int64)
    assert torch.equal(isqrt(t), torch.tensor([math.isqrt(v) for v in values]))
    assert torch.equal(bit_length(t), torch.tensor([v.bit_length() for v in values]))


# -- requantization --------------------------------------------------------------------------------------
def test_requantize_equals_rational_arithmetic_and_rounds_half_up_within_its_bound():
    rng = np.random.default_rng(0)
    m = rng.uniform(1e-4, 3e-3, 16)  # real multipliers per channel, two terms
    m2 = rng.uniform(0.1, 4.0, 16)
    r = rng.uniform(-50, 50, 16)
    sh = 40  # the sums stay below 2^54: int64 with room
    M1, M2, R = fixed_point(m, sh), fixed_point(m2, sh), fixed_point(r + 0.5, sh)
    x1 = torch.tensor(rng.integers(-(2**22), 2**22, (200, 16)), dtype=torch.int32)
    x2 = torch.tensor(rng.integers(0, 256, (200, 16)), dtype=torch.int32)
    y = requantize([(x1, torch.tensor(M1)), (x2, torch.tensor(M2))], torch.tensor(R), sh, -(2**20), 2**20)
    for i in range(0, 200, 17):
        for c in range(16):
            exact = Fraction(int(M1[c]) * int(x1[i, c]) + int(M2[c]) * int(x2[i, c]) + int(R[c]), 2**sh)
            assert int(y[i, c]) == max(-(2**20), min(2**20, math.floor(exact)))  # floor of the integer formula
            real = Fraction(float(m[c])) * int(x1[i, c]) + Fraction(float(m2[c])) * int(x2[i, c]) + Fraction(float(r[c]))
            delta = Fraction(abs(int(x1[i, c])) + abs(int(x2[i, c])) + 1, 2 ** (sh + 1))  # the docstring's bound
            assert math.floor(real + Fraction(1, 2) - delta) <= int(y[i, c]) <= math.floor(real + Fraction(1, 2) + delta)


def test_requantize_clamps_to_its_range():
    x = torch.tensor([-(10**6), 0, 10**6])
    assert requantize([(x, torch.tensor(1 << 10))], torch.tensor(0), 10, 0, 255).tolist() == [0, 0, 255]


# -- exact integer matmuls -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 7, 5), (197, 192, 64), (33, 768, 40)])
@pytest.mark.parametrize("zero", [0, 128, 201])
def test_linear_int_is_exact(shape, zero):
    g = torch.Generator().manual_seed(1)
    rows, k, n = shape
    x = torch.randint(0, 256, (2, rows, k), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    ref = (x.long() - zero) @ w.long()
    assert torch.equal(linear_int(x, zero, w).long(), ref)


def test_matmul_int_is_exact_in_float32_and_float64_ranges():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (2, 3, 50, 64), generator=g)
    b = torch.randint(0, 256, (2, 3, 64, 50), generator=g)
    assert torch.equal(matmul_int(a, 100, b, 7, 64 * 255 * 255).long(), (a - 100) @ (b - 7))
    w = 1 << torch.randint(0, 15, (2, 3, 50, 300), generator=g)  # log2 attention weights: beyond float32's 2^24
    v = torch.randint(0, 256, (2, 3, 300, 16), generator=g)
    assert torch.equal(matmul_int(w, 0, v, 128, 300 * 2**14 * 128).long(), w @ (v - 128))


# -- i-exp and softmax ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.05, 0.16, 0.3, 0.7, 2.0])
def test_iexp_within_stated_bounds_in_int32(scale):
    iexp = IExp.for_scale(scale)
    d = -torch.arange(0, int(25 / scale) + 1, dtype=torch.int64)
    exp_int, z, poly = iexp(d)
    assert iexp.peak < 2**29 and int(poly.max()) < 2**29  # int32 holds every intermediate
    assert 4096 <= iexp.ln2 < 8192
    approx = exp_int.double() * iexp.value_scale
    ref = torch.exp(d.double() * scale)
    assert float((approx - ref).abs().max()) <= IEXP_MAX_ABS_ERROR
    big = ref >= 2.0**-12
    assert float((approx / ref - 1).abs()[big].max()) <= IEXP_MAX_REL_ERROR
    assert torch.all(exp_int[:-1] >= exp_int[1:])  # monotone


def _scores(seed: int = 0, scale: float = 0.12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.round(torch.randn(2, 3, 50, 50, generator=g) * 4 / scale).long()
    d = codes - codes.amax(-1, keepdim=True)
    return d, torch.softmax(d.double() * scale, -1)


def test_uniform_softmax_codes_follow_the_float_softmax_within_the_iexp_error():
    d, p = _scores()
    s_a = 1 / 255
    codes = IntSoftmax.uniform(0.12, s_a, 0, 255).codes(d)
    assert codes.min() >= 0 and codes.max() <= 255
    target = p / s_a
    # Rounding (1/2) plus the probabilities' relative error: twice i-exp's (a ratio of two sums), plus the
    # absolute error of small exponentials summed over the row.
    assert torch.all((codes.double() - target).abs() <= 0.5 + 2 * IEXP_MAX_REL_ERROR * target + 50 * IEXP_MAX_ABS_ERROR * 2.0**-12 / s_a + 0.02)
    assert IntSoftmax.uniform(0.12, s_a, 0, 255).codes(torch.tensor([[0, -2000, -2000]])).tolist() == [[255, 0, 0]]


def test_log2_softmax_codes_are_the_nearest_log_level_outside_the_approximation_band():
    d, p = _scores(1)
    codes = IntSoftmax.log2(0.12, 0, 15).codes(d)
    t = -torch.log2(p)
    exact = torch.floor(t + 0.5).clamp(0, 15)
    band = LOG2_MAX_ERROR * 2 + 2 * IEXP_MAX_REL_ERROR / math.log(2) + 2.0**-14
    far = ((t - torch.floor(t)) - 0.5).abs() > band
    assert torch.equal(codes.double()[far], exact[far])
    assert float((codes.double() - exact).abs().max()) <= 1


def test_log2_fixed_within_its_bound():
    g = torch.Generator().manual_seed(3)
    v = torch.cat([torch.randint(1, 2**40, (50000,), generator=g), torch.arange(1, 70000)])
    err = (log2_fixed(v).double() / 2**16 - torch.log2(v.double())).abs().max()
    assert float(err) <= LOG2_MAX_ERROR


# -- LayerNorm -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,bits", [(32, 8), (192, 8), (768, 10)])
def test_integer_layernorm_within_its_bound_of_float64(channels, bits):
    rng = np.random.default_rng(channels)
    top = 2**bits - 1
    zero = rng.integers(top // 3, 2 * top // 3, channels)
    shift = rng.integers(0, 4, channels)
    unit = 0.01
    gamma, beta = rng.normal(1, 0.5, channels), rng.normal(0, 0.3, channels)
    out_scale, out_zero = 0.03, 128
    ln = IntLayerNorm.build(zero, shift, top, unit, gamma, beta, 1e-6, np.full(channels, out_scale), np.full(channels, out_zero), 0, 255)
    u = torch.tensor(rng.integers(0, top + 1, (64, 9, channels)))
    y = ln(u).double()
    x = (u.double() - torch.tensor(zero)) * torch.tensor(2.0**shift) * unit
    ref = F.layer_norm(x, (channels,), torch.tensor(gamma), torch.tensor(beta), 1e-6) / out_scale + out_zero
    t = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    sigma = torch.sqrt((x.var(-1, unbiased=False, keepdim=True) + 1e-6) / unit**2) * channels * 2**ln.f
    ratio = float(np.abs(gamma).max()) / out_scale
    bound = 0.5 + t.abs() * (ratio / sigma + 2.0 ** -(ln.g + 1)) + 2.0 ** -(ln.g + 1)
    inside = (ref > 0.5) & (ref < 254.5)
    assert torch.all((y - ref).abs()[inside] <= bound[inside] + 1e-9)
    # Round half up of the exact LayerNorm almost everywhere (only values within the bound of a tie differ).
    assert float((y == torch.floor(ref + 0.5).clamp(0, 255)).double().mean()) > 0.9999


def test_integer_layernorm_of_a_constant_token_is_the_bias():
    c = 16
    ln = IntLayerNorm.build(np.full(c, 128), np.zeros(c, np.int64), 255, 0.05, np.ones(c), np.linspace(-1, 1, c), 1e-6,
                            np.full(c, 0.02), np.full(c, 100), 0, 255)  # fmt: skip
    y = ln(torch.full((1, 3, c), 140))
    assert torch.equal(y[0, 0], torch.round(torch.tensor(np.linspace(-1, 1, c)) / 0.02 + 100).long())


# -- GELU ------------------------------------------------------------------------------------------------
def test_gelu_table_within_its_bound_of_float64_gelu():
    table = GeluTable.up_to(10.24)
    assert table.size == 4096 and table.lo == LOW
    x = torch.linspace(LOW, table.lo + (table.size - 1) * table.step, 200001, dtype=torch.float64)
    err = (table.lookup(x) - F.gelu(x)).abs().max()
    assert float(err) <= table.error_bound()
    assert torch.equal(table.lookup(x), table.values(table.index(x)))  # the gathered entries are GELU at the grid points
    below = torch.linspace(-50, LOW, 1001, dtype=torch.float64)  # clamped to the first entry
    assert float((table.lookup(below) - F.gelu(below)).abs().max()) < 1.5e-6
    # Round half up to the nearest grid point.
    assert table.index(torch.tensor([LOW + 2.5 * table.step, LOW + 2.4999 * table.step], dtype=torch.float64)).tolist() == [3, 2]
