"""Property-based tests of the PIFA math (rank bookkeeping and pivot factorization)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pifa_modifier.math import (
    density_of_rank,
    factorize_dense,
    output_permutation,
    pifa_params,
    pivot_factorize,
    rank_for_density,
)


@st.composite
def factor_pairs(draw):
    """(A, B) with m, n in [2, 48], any rank up to min(m, n), condition up to 1e6."""
    m = draw(st.integers(2, 48))
    n = draw(st.integers(2, 48))
    r = draw(st.integers(1, min(m, n)))
    log_cond = draw(st.floats(0.0, 6.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    qa, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -log_cond, r, dtype=torch.float64)
    # random scaling of A's columns so A itself is not orthonormal
    a = qa * s * torch.rand(r, generator=g, dtype=torch.float64).add(0.5)
    return a, qb.T.contiguous()


@settings(max_examples=150, deadline=None)
@given(factor_pairs())
def test_pifa_reproduces_product(pair):
    a, b = pair
    f = pivot_factorize(a, b)
    w = a @ b
    assert ((f.reconstruct() - w).norm() / w.norm()).item() < 1e-10
    assert f.pivot_idx.dtype == torch.int32
    assert bool((f.pivot_idx[1:] > f.pivot_idx[:-1]).all())
    if f.coeff.numel():
        assert f.coeff.abs().max().item() <= 1 + 1e-3
    r, (m, n) = a.shape[1], w.shape
    assert f.pivot_rows.numel() + f.coeff.numel() == r * (m + n - r)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 5000), st.integers(2, 5000), st.data())
def test_density_inverse_round_trips(m, n, data):
    r = data.draw(st.integers(1, min(m, n) - 1))
    assert rank_for_density(m, n, density_of_rank(m, n, r)) == r


@settings(max_examples=200, deadline=None)
@given(
    st.integers(64, 8192),
    st.integers(64, 8192),
    st.floats(0.05, 0.95),
    st.sampled_from([1, 8, 32, 64, 128]),
)
def test_rank_rounds_down_to_multiple(m, n, density, multiple):
    try:
        r = rank_for_density(m, n, density, rank_multiple=multiple)
    except ValueError as err:  # only when nothing fits
        assert "leaves no rank" in str(err)
        assert rank_for_density(m, n, density) < multiple
        return
    assert r % multiple == 0
    assert pifa_params(m, n, r) <= density * m * n * (1 + 1e-12)
    nxt = r + multiple
    assert nxt >= min(m, n) or pifa_params(m, n, nxt) > density * m * n


def test_known_values():
    # square, r/d = 0.5 -> density 2k - k^2 = 0.75
    assert density_of_rank(4096, 4096, 2048) == 0.75
    assert rank_for_density(4096, 4096, 0.75) == 2048
    assert rank_for_density(4096, 4096, 0.5, rank_multiple=128) == 1152


def test_rank_deficient_factors_reencode_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    a[:, 5] = 0  # a dead direction
    a[7] = 0  # a zero output row
    b = torch.randn(12, 30, generator=g, dtype=torch.float64)
    f = pivot_factorize(a, b)
    assert torch.allclose(f.reconstruct(), a @ b, atol=1e-12)
    assert f.coeff.abs().max() <= 1 + 1e-3


def test_float32_inputs_are_computed_in_float64_and_gpu_agnostic_dtype():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, 4, generator=g), torch.randn(4, 9, generator=g)
    f = pivot_factorize(a, b)
    assert f.pivot_rows.dtype == torch.float64
    assert torch.allclose(f.reconstruct().float(), a @ b, atol=1e-5)


def test_factorize_dense_is_truncated_svd():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    f = factorize_dense(w, 7)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :7] * s[:7]) @ vh[:7]
    assert torch.allclose(f.reconstruct(), best, atol=1e-10)


def test_output_permutation_restores_order():
    piv = torch.tensor([1, 4, 5], dtype=torch.int32)
    perm = output_permutation(piv, 7)
    y = torch.arange(7.0)
    stacked = torch.cat([y[piv.long()], y[torch.tensor([0, 2, 3, 6])]])
    assert torch.equal(stacked[perm], y)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        rank_for_density(64, 64, density)


@pytest.mark.parametrize("density", ["0.5", None, True])
def test_density_wrong_type(density):
    with pytest.raises(TypeError, match="density must be a number"):
        rank_for_density(64, 64, density)


def test_density_one_saves_nothing():
    with pytest.raises(ValueError, match="saves nothing"):
        rank_for_density(64, 32, 1.0)


def test_density_too_small_for_multiple():
    with pytest.raises(ValueError, match="leaves no rank"):
        rank_for_density(64, 64, 0.1, rank_multiple=64)


@pytest.mark.parametrize("multiple", [0, -1, 2.0])
def test_bad_rank_multiple(multiple):
    with pytest.raises(ValueError, match="rank_multiple"):
        rank_for_density(64, 64, 0.5, rank_multiple=multiple)


@pytest.mark.parametrize("shape", [(0, 5), (5, -1), (2.5, 4)])
def test_bad_layer_shape(shape):
    with pytest.raises(ValueError, match="positive integer"):
        rank_for_density(*shape, 0.5)


def test_pifa_params_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 9 is out of range"):
        pifa_params(8, 16, 9)


def test_pivot_factorize_shape_errors():
    with pytest.raises(ValueError, match="inner dimensions differ"):
        pivot_factorize(torch.randn(8, 3), torch.randn(4, 8))
    with pytest.raises(ValueError, match="must be 2-D"):
        pivot_factorize(torch.randn(2, 8, 3), torch.randn(3, 8))
    with pytest.raises(ValueError, match="out of range"):
        pivot_factorize(torch.randn(8, 6), torch.randn(6, 4))  # r > n


def test_pivot_factorize_non_finite():
    a = torch.randn(8, 3)
    a[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pivot_factorize(a, torch.randn(3, 8))


def test_factorize_dense_errors():
    with pytest.raises(ValueError, match="must be 2-D"):
        factorize_dense(torch.randn(4, 4, 4), 2)
    with pytest.raises(ValueError, match="out of range"):
        factorize_dense(torch.randn(4, 6), 5)
    with pytest.raises(ValueError, match="out of range"):
        factorize_dense(torch.randn(4, 6), 0)


def _stats(n: int, tokens: int, shift: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x_old = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    x_new = x_old + shift * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return x_old, x_new


def _m_objective(w, a, b, x_old, x_new, lam):
    target = (1 - lam) * x_new @ w.T + lam * x_old @ w.T
    return float((target - x_new @ (a @ b).T).norm() ** 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(8, 24), st.integers(8, 24), st.integers(0, 10**6), st.floats(0, 1))
def test_m_refit_never_increases_its_objective(m, n, seed, lam):
    from pifa_modifier.math.reconstruct import m_refit, whitened_svd

    x_old, x_new = _stats(n, 4 * n, 0.3, seed)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = max(1, min(m, n) // 3)
    a, b = whitened_svd(w, x_old.T @ x_old, r, dampening=0.0)
    h, k = x_new.T @ x_new, x_old.T @ x_new
    prev = _m_objective(w, a, b, x_old, x_new, lam)
    for steps in (1, 2, 3, 4):
        a2, b2 = m_refit(w, a, b, h, k, lam, steps, ridge=0.0)
        cur = _m_objective(w, a2, b2, x_old, x_new, lam)
        assert cur <= prev * (1 + 1e-9) + 1e-9
        prev = cur


def test_whitened_svd_is_optimal_when_streams_agree():
    """SVD-LLM is the optimal rank-r fit for ||(W - AB) X||; M cannot improve it."""
    from pifa_modifier.math.reconstruct import m_refit, relative_output_error, whitened_svd

    x, _ = _stats(20, 200, 0.0, 3)
    w = torch.randn(16, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = x.T @ x
    a, b = whitened_svd(w, h, 5, dampening=0.0)
    base = relative_output_error(w, a @ b, h)
    a2, b2 = m_refit(w, a, b, h, h, 0.25, 4, ridge=0.0)
    assert relative_output_error(w, a2 @ b2, h) == pytest.approx(base, rel=1e-6)
    # and it beats plain truncated SVD on that norm
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert base < relative_output_error(w, (u[:, :5] * s[:5]) @ vh[:5], h)


def test_statistics_errors():
    from pifa_modifier.math.reconstruct import damped, whitened_svd

    with pytest.raises(ValueError, match="all zero"):
        damped(torch.zeros(4, 4), 0.01)
    bad = torch.eye(4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        whitened_svd(torch.randn(3, 4), bad, 2)
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0  # three dead features: dampening keeps it positive definite
    a, b = whitened_svd(torch.randn(3, 4), singular, 2)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
