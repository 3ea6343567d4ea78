"""Rank <-> density bookkeeping for PIFA layers.

A rank-r PIFA layer of an m x n weight stores r pivot rows (r*n) and the
coefficients of the other m-r rows ((m-r)*r): r*(m+n-r) parameters. The r
int32 pivot indices are metadata and are not counted (as in the paper).
"""

from __future__ import annotations

import math

__all__ = ["pifa_params", "density_of_rank", "rank_for_density"]


def pifa_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameters stored by a rank-``rank`` PIFA layer (indices excluded)."""
    _check_shape(out_features, in_features)
    if not 0 < rank <= min(out_features, in_features):
        raise ValueError(
            f"rank {rank} is out of range for a {out_features}x{in_features} layer: "
            f"it must be in [1, {min(out_features, in_features)}]"
        )
    return rank * (out_features + in_features - rank)


def density_of_rank(out_features: int, in_features: int, rank: int) -> float:
    """Kept fraction of the dense m*n parameters at this rank."""
    return pifa_params(out_features, in_features, rank) / (out_features * in_features)


def rank_for_density(
    out_features: int, in_features: int, density: float, rank_multiple: int = 1
) -> int:
    """Largest rank (a multiple of ``rank_multiple``) whose PIFA density <= ``density``.

    Rounds down so the achieved density never exceeds the target. Raises when
    the result would save nothing (rank >= min(m, n)) or would be zero.
    """
    _check_shape(out_features, in_features)
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number in (0, 1], got {density!r}")
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive integer, got {rank_multiple!r}")

    m, n = out_features, in_features
    budget = density * m * n
    # smallest root of r^2 - (m+n) r + budget = 0; the discriminant is >= (m-n)^2 >= 0
    root = ((m + n) - math.sqrt(max((m + n) ** 2 - 4.0 * budget, 0.0))) / 2.0
    rank = min(int(math.floor(root + 1e-9)), min(m, n))
    # exact integer fix-up: params(r) is increasing for r <= (m+n)/2 >= min(m, n)
    tol = budget * 1e-12
    while rank < min(m, n) and (rank + 1) * (m + n - rank - 1) <= budget + tol:
        rank += 1
    while rank > 0 and rank * (m + n - rank) > budget + tol:
        rank -= 1
    rank -= rank % rank_multiple

    if rank >= min(m, n):
        raise ValueError(
            f"PIFA saves nothing on a {m}x{n} layer at density {density}: the rank would be "
            f"{rank} >= min(m, n) = {min(m, n)}. Use a density below 1 or ignore this layer."
        )
    if rank == 0:
        raise ValueError(
            f"density {density} leaves no rank on a {m}x{n} layer with rank_multiple "
            f"{rank_multiple}: raise the density, lower rank_multiple, or ignore this layer."
        )
    return rank


def _check_shape(out_features: int, in_features: int) -> None:
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
