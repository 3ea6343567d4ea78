"""Pivoting factorization (PIFA) of a low-rank product, in pure torch (+ LAPACK QRCP).

``W = A @ B`` (A m x r, B r x n) has exactly r linearly independent rows, and
rows of ``A @ B`` are independent iff the same rows of ``A`` are. So pick r
pivot rows from ``A`` alone (never forming the m x n product for the search),
then store ``P = (A B)[piv]`` and ``C = A[nonpiv] A[piv]^-1``: ``W[nonpiv] = C P``.

The search runs on an orthonormal basis ``Q`` of ``A``'s columns (``A = Q R``):
C is invariant to ``A -> A M``, and Q has full column rank even when A does not,
so rank-deficient factors (dead features, zero rows) still re-encode exactly.
Pivots come from QR with column pivoting on ``Q^T`` and are refined by
maximal-volume swaps until every ``|C_ij| <= 1 + tol``; small coefficients keep
fp16/bf16 rounding and quantization of C benign.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch

__all__ = [
    "PivotFactors",
    "pivot_factorize",
    "factorize_dense",
    "non_pivot_index",
    "output_permutation",
]


@dataclass(frozen=True)
class PivotFactors:
    """A rank-r weight in pivot form: ``W[pivot_idx] = P``, ``W[other rows] = C @ P``."""

    pivot_idx: torch.Tensor  # (r,) int32, strictly ascending
    pivot_rows: torch.Tensor  # P, (r, n)
    coeff: torch.Tensor  # C, (m - r, r)

    @property
    def rank(self) -> int:
        return self.pivot_rows.shape[0]

    @property
    def in_features(self) -> int:
        return self.pivot_rows.shape[1]

    @property
    def out_features(self) -> int:
        return self.rank + self.coeff.shape[0]

    def reconstruct(self) -> torch.Tensor:
        """The dense m x n weight (in the factors' dtype)."""
        return reconstruct_dense(self.pivot_idx, self.pivot_rows, self.coeff)


def reconstruct_dense(
    pivot_idx: torch.Tensor, pivot_rows: torch.Tensor, coeff: torch.Tensor
) -> torch.Tensor:
    """Scatter ``P`` and ``C @ P`` back into an m x n weight in original row order."""
    rank, n = pivot_rows.shape
    m = rank + coeff.shape[0]
    weight = pivot_rows.new_empty(m, n)
    weight[pivot_idx.long()] = pivot_rows
    weight[non_pivot_index(pivot_idx, m)] = coeff @ pivot_rows
    return weight


def non_pivot_index(pivot_idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """Ascending int64 indices of the rows that are not pivots."""
    mask = torch.ones(out_features, dtype=torch.bool, device=pivot_idx.device)
    mask[pivot_idx.long()] = False
    return mask.nonzero().flatten()


def output_permutation(pivot_idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """Index ``perm`` with ``cat([y_piv, y_nonpiv], -1)[..., perm] == y`` (original order)."""
    order = torch.cat([pivot_idx.long(), non_pivot_index(pivot_idx, out_features)])
    return torch.argsort(order)


def pivot_factorize(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    tol: float = 1e-3,
    max_swaps: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> PivotFactors:
    """Re-encode ``A @ B`` in pivot form without forming the product for the pivot search.

    Returns factors in ``compute_dtype`` on ``A``'s device; cast them to the
    model dtype yourself. ``max_swaps`` bounds the maxvol refinement (default
    ``10 * r + 100``); the product is reproduced exactly either way.
    """
    _check_factors(A, B)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    m, r = A.shape
    a = A.detach().to(compute_dtype)
    b = B.detach().to(device=a.device, dtype=compute_dtype)

    basis, _ = torch.linalg.qr(a)  # m x r, orthonormal columns even if A is rank deficient
    piv = _maxvol(basis, _qrcp_pivots(basis), tol, 10 * r + 100 if max_swaps is None else max_swaps)
    piv = torch.sort(piv).values
    nonpiv = non_pivot_index(piv, m)
    coeff = torch.linalg.solve(basis[piv], basis[nonpiv], left=False)
    return PivotFactors(pivot_idx=piv.to(torch.int32), pivot_rows=a[piv] @ b, coeff=coeff)


def factorize_dense(
    weight: torch.Tensor,
    rank: int,
    *,
    tol: float = 1e-3,
    compute_dtype: torch.dtype = torch.float64,
) -> PivotFactors:
    """Truncated SVD of a dense weight at ``rank``, then pivot form (plain SVD, no data)."""
    if weight.ndim != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}"
        )
    m, n = weight.shape
    _check_rank(rank, m, n)
    _check_finite(weight, "weight")
    u, s, vh = torch.linalg.svd(weight.detach().to(compute_dtype), full_matrices=False)
    return pivot_factorize(
        u[:, :rank], s[:rank, None] * vh[:rank], tol=tol, compute_dtype=compute_dtype
    )


def _qrcp_pivots(basis: torch.Tensor) -> torch.Tensor:
    """First r column pivots of LAPACK's QR with column pivoting (geqp3) on ``basis^T``."""
    _, perm = scipy.linalg.qr(basis.T.cpu().numpy(), mode="r", pivoting=True, check_finite=False)
    return torch.from_numpy(perm[: basis.shape[1]].copy()).to(basis.device)


def _maxvol(basis: torch.Tensor, piv: torch.Tensor, tol: float, max_swaps: int) -> torch.Tensor:
    """Swap pivots until ``max|basis @ basis[piv]^-1| <= 1 + tol`` (Goreinov et al.'s maxvol).

    Each swap multiplies the pivot block's volume by ``|c_ij| > 1 + tol``, so it
    terminates; ``c`` is recomputed exactly every 32 swaps to stop drift.
    """
    piv = piv.clone()
    swaps = 0
    while swaps < max_swaps:
        c = torch.linalg.solve(basis[piv], basis, left=False)  # m x r, rows piv are I
        swapped = False
        for _ in range(min(32, max_swaps - swaps)):
            flat = int(torch.argmax(c.abs()))
            i, j = divmod(flat, c.shape[1])
            pivot_value = c[i, j]
            if abs(float(pivot_value)) <= 1.0 + tol:
                break
            row = c[i].clone()
            row[j] -= 1.0
            c -= torch.outer(c[:, j] / pivot_value, row)
            piv[j] = i
            swaps += 1
            swapped = True
        if not swapped:
            break
    return piv


def _check_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(
            f"A and B must be 2-D (m x r and r x n), got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[1] != B.shape[0]:
        raise ValueError(
            f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}; "
            "A @ B needs A.shape[1] == B.shape[0]"
        )
    m, r = A.shape
    _check_rank(r, m, B.shape[1])
    _check_finite(A, "A")
    _check_finite(B, "B")


def _check_rank(rank: int, m: int, n: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(m, n):
        raise ValueError(
            f"rank {rank!r} is out of range for a {m}x{n} weight: it must be an integer in "
            f"[1, {min(m, n)}] (and below {min(m, n)} to save parameters)"
        )


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf values; PIFA needs finite factors")
