"""PIFA math in pure torch: rank/density bookkeeping, pivot factorization, M refits.

Nothing here imports llmcompressor, so it can be reused by any runtime.
"""

from pifa_modifier.math.pivot import (
    PivotFactors,
    factorize_dense,
    non_pivot_index,
    output_permutation,
    pivot_factorize,
    reconstruct_dense,
)
from pifa_modifier.math.rank import density_of_rank, pifa_params, rank_for_density

__all__ = [
    "PivotFactors",
    "density_of_rank",
    "factorize_dense",
    "non_pivot_index",
    "output_permutation",
    "pifa_params",
    "pivot_factorize",
    "rank_for_density",
    "reconstruct_dense",
]
