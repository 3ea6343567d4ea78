"""PIFALinear: forward equivalence, precision bounds, tracing, state dicts, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pifa_modifier.module import PIFALinear


def _factors(m: int, n: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g, dtype=torch.float64) / r**0.5
    b = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5
    return a, b, torch.randn(m, generator=g, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 40),
    st.integers(1, 40),
    st.data(),
    st.booleans(),
    st.sampled_from([(3,), (2, 5), (1, 2, 3), ()]),
)
def test_forward_matches_dense_fp32(m, n, data, with_bias, lead):
    r = data.draw(st.integers(1, min(m - 1, n)))
    a, b, bias = _factors(m, n, r, seed=m * 100 + n)
    layer = PIFALinear.from_factors(a, b, bias if with_bias else None, dtype=torch.float32)
    x = torch.randn(*lead, n)
    ref = torch.nn.functional.linear(x.double(), a @ b, bias if with_bias else None)
    out = layer(x)
    assert out.shape == (*lead, m) and out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item() < 1e-5
    dense = layer.to_linear()
    assert torch.allclose(dense(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_bounded(dtype):
    """Measured (m=n=1024, r=512): non-pivot rows carry 3-4x the A@B path's rounding error."""
    m = n = 256
    r = 128
    a, b, bias = _factors(m, n, r, seed=7)
    layer = PIFALinear.from_factors(a, b, bias, dtype=dtype)
    x = torch.randn(64, n, dtype=torch.float64)
    truth = torch.nn.functional.linear(x, a @ b, bias)
    xl = x.to(dtype)
    out = layer(xl).double()
    plain = ((xl @ b.to(dtype).T) @ a.to(dtype).T + bias.to(dtype)).double()
    err_pifa = ((out - truth).norm() / truth.norm()).item()
    err_plain = ((plain - truth).norm() / truth.norm()).item()
    assert err_pifa <= 6 * err_plain
    assert err_pifa < (5e-3 if dtype == torch.float16 else 4e-2)


def test_fx_trace():
    a, b, bias = _factors(24, 16, 6)
    layer = PIFALinear.from_factors(a, b, bias, dtype=torch.float32)
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(2, 3, 16)
    assert torch.equal(traced(x), layer(x))


def test_state_dict_round_trip_rebuilds_permutation():
    a, b, bias = _factors(24, 16, 6, seed=3)
    src = PIFALinear.from_factors(a, b, bias, dtype=torch.float32)
    assert set(src.state_dict()) == {"pivot.weight", "coeff.weight", "bias", "pivot_idx"}
    assert src.state_dict()["pivot_idx"].dtype == torch.int32
    dst = PIFALinear(16, 24, 6)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 16)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([0, 2, 2, 5, 6, 7]), "strictly ascending"),
        (torch.tensor([0, 3, 2, 5, 6, 7]), "strictly ascending"),
        (torch.tensor([0, 1, 2, 5, 6, 24]), r"lie in \[0, 24\)"),
        (torch.tensor([-1, 1, 2, 5, 6, 7]), r"lie in \[0, 24\)"),
        (torch.tensor([0, 1, 2]), r"shape \(6,\)"),
    ],
)
def test_bad_pivot_idx_is_rejected(bad, match):
    layer = PIFALinear(16, 24, 6)
    with pytest.raises(ValueError, match=match):
        layer.set_pivot_idx(bad)
    sd = layer.state_dict()
    sd["pivot_idx"] = bad
    with pytest.raises((ValueError, RuntimeError), match=match if bad.shape == (6,) else "size"):
        layer.load_state_dict(sd)


def test_float_pivot_idx_is_rejected():
    with pytest.raises(ValueError, match="integer tensor"):
        PIFALinear(16, 24, 6).set_pivot_idx(torch.arange(6.0))


def test_from_linear_and_extra_repr():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    layer = PIFALinear.from_linear(lin, 8)
    assert "in_features=32, out_features=48, rank=8, density=0.375" in repr(layer)
    assert not isinstance(layer, nn.Linear)
    assert isinstance(layer.pivot, nn.Linear) and isinstance(layer.coeff, nn.Linear)
    assert layer.density == pytest.approx(8 * (48 + 32 - 8) / (48 * 32))
    # truncated SVD is the best rank-8 approximation
    u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    assert torch.allclose(layer.to_dense().double(), best, atol=1e-5)
    assert torch.equal(layer.bias, lin.bias)


@pytest.mark.parametrize(
    "args, match",
    [
        ((16, 24, 0), "rank 0 is invalid"),
        ((16, 24, 24), "rank 24 is invalid"),
        ((16, 24, 17), "rank 17 is invalid"),
        ((0, 24, 4), "in_features must be a positive integer"),
        ((16, -2, 4), "out_features must be a positive integer"),
    ],
)
def test_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        PIFALinear(*args)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        PIFALinear.from_linear(nn.Conv1d(4, 4, 1), 2)


def test_load_pivot_factors_checks_shapes_and_bias():
    a, b, bias = _factors(24, 16, 6)
    src = PIFALinear.from_factors(a, b, bias)
    from pifa_modifier.math import pivot_factorize

    factors = pivot_factorize(a, b)
    with pytest.raises(ValueError, match=r"\(out, in, rank\)"):
        PIFALinear(16, 24, 5).load_pivot_factors(factors, bias)
    with pytest.raises(ValueError, match="bias presence"):
        PIFALinear(16, 24, 6, bias=False).load_pivot_factors(factors, bias)
    assert src.rank == 6
