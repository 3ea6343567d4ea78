"""``PIFALinear``: a rank-r linear layer stored as r pivot rows plus coefficients.

It is deliberately *not* an ``nn.Linear`` subclass: quantization modifiers
(GPTQ) must see and quantize its two real ``nn.Linear`` children, ``pivot``
(n -> r, weight P) and ``coeff`` (r -> m-r, weight C), rather than the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pifa_modifier.kernels import (
    pifa_forward,
    pifa_quant_forward,
    use_triton_kernels,
    use_triton_quant_kernels,
)
from pifa_modifier.kernels.packed import PackedFactors, dequantize_packed, packed_factors
from pifa_modifier.math import (
    PivotFactors,
    density_of_rank,
    factorize_dense,
    non_pivot_index,
    output_permutation,
    pivot_factorize,
    reconstruct_dense,
)

__all__ = ["PIFALinear"]


class PIFALinear(nn.Module):
    """``y = x W^T + b`` with ``W[pivot_idx] = P`` and ``W[other rows] = C P``.

    Forward: ``y_p = pivot(x)``, ``y_np = coeff(y_p)``, both scattered into the
    original row order through a permutation derived from ``pivot_idx`` (a
    non-persistent buffer, rebuilt whenever ``pivot_idx`` is loaded or set).

    While ``dense_weight`` is set (a skeleton placed by ``PIFAModifier`` before
    calibration), the layer computes with that dense weight instead; it is
    never saved.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_dims(in_features, out_features, rank)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.pivot = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.coeff = nn.Linear(rank, out_features - rank, bias=False, device=device, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        pivot_idx = torch.arange(rank, dtype=torch.int32, device=device)
        self.register_buffer("pivot_idx", pivot_idx)
        # the default pivots are rows 0..r-1, so the permutation starts as the identity
        # (built without nonzero(), so skeletons can live on the meta device)
        self.register_buffer(
            "out_perm", torch.arange(out_features, device=device), persistent=False
        )
        # plain attribute, not a buffer: never saved, never offloaded, shared with the source
        self.dense_weight: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_weight is not None:
            return F.linear(x, self.dense_weight.to(x.device), self.bias)
        packed = packed_factors(self)  # None unless both children are packed int4/int8
        if packed is not None:
            return self._packed_forward(x, packed)
        if use_triton_kernels(self, x):
            return pifa_forward(
                x,
                self.pivot.weight,
                self.coeff.weight,
                self.pivot_idx,
                self.nonpivot_index(),
                self.bias,
            )
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        y_pivot = self.pivot(x)
        y = torch.cat([y_pivot, self.coeff(y_pivot)], dim=-1).index_select(-1, self.out_perm)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _packed_forward(self, x: torch.Tensor, packed: PackedFactors) -> torch.Tensor:
        """Factors that stay packed (``pifa_modifier.kernels.packed``), so memory stays low.

        CUDA: kernels that dequantize inside the GEMM tiles. Elsewhere (CPU, hooks,
        autograd, tracing): the children's own forwards, each given its weight
        dequantized for this call only -- bit-identical to a decompressed model.
        """
        if use_triton_quant_kernels(self, x, packed):
            return pifa_quant_forward(
                x, packed.pivot, packed.coeff, self.pivot_idx, self.nonpivot_index(), self.bias
            )
        children = (self.pivot, self.coeff)
        try:
            for child, weight in zip(children, packed, strict=True):
                child.weight = dequantize_packed(weight)  # plain attribute: not a parameter
            return self._torch_forward(x)
        finally:
            for child in children:
                vars(child).pop("weight", None)

    # ------------------------------------------------------------ construction
    @classmethod
    def skeleton_of(cls, linear: nn.Linear, rank: int) -> PIFALinear:
        """A rank-``rank`` layer that computes like ``linear`` until factors are loaded.

        Final shapes exist from the start (so quantization modifiers can attach
        to ``pivot``/``coeff``); the dense weight is shared, not copied.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"skeleton_of expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.dense_weight = weight.detach()
        return layer

    @classmethod
    def from_pivot_factors(
        cls,
        factors: PivotFactors,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> PIFALinear:
        """Build a layer holding ``factors`` (cast to ``dtype``, default: the factors' dtype)."""
        dtype = dtype or factors.pivot_rows.dtype
        device = device or factors.pivot_rows.device
        layer = cls(
            factors.in_features,
            factors.out_features,
            factors.rank,
            bias=bias is not None,
            device=device,
            dtype=dtype,
        )
        layer.load_pivot_factors(factors, bias)
        return layer

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        tol: float = 1e-3,
    ) -> PIFALinear:
        """PIFA-encode a low-rank product ``A @ B`` (A m x r, B r x n), plus an optional bias."""
        factors = pivot_factorize(A, B, tol=tol)
        return cls.from_pivot_factors(factors, bias, dtype=dtype or A.dtype, device=A.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, tol: float = 1e-3) -> PIFALinear:
        """Truncated-SVD + PIFA of a dense layer (no calibration data; see PIFAModifier)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        factors = factorize_dense(linear.weight, rank, tol=tol)
        return cls.from_pivot_factors(
            factors, linear.bias, dtype=linear.weight.dtype, device=linear.weight.device
        )

    @torch.no_grad()
    def load_pivot_factors(self, factors: PivotFactors, bias: torch.Tensor | None = None) -> None:
        """Copy ``factors`` (and ``bias``) into this layer's tensors, in place."""
        expected = (self.out_features, self.in_features, self.rank)
        got = (factors.out_features, factors.in_features, factors.rank)
        if got != expected:
            raise ValueError(f"factors are (out, in, rank) = {got}, this layer is {expected}")
        if (bias is None) != (self.bias is None):
            raise ValueError("bias presence differs between the factors and this layer")
        self.pivot.weight.copy_(factors.pivot_rows)
        self.coeff.weight.copy_(factors.coeff)
        if bias is not None:
            self.bias.copy_(bias)
        self.set_pivot_idx(factors.pivot_idx)
        self.dense_weight = None

    @torch.no_grad()
    def set_pivot_idx(self, pivot_idx: torch.Tensor) -> None:
        """Validate and set the pivot rows, then rebuild the output permutation."""
        validate_pivot_idx(pivot_idx, self.out_features, self.rank)
        self.pivot_idx.copy_(pivot_idx.to(torch.int32))
        self.refresh_permutation()

    @torch.no_grad()
    def refresh_permutation(self) -> None:
        """Derive ``out_perm`` from ``pivot_idx`` (call after writing ``pivot_idx`` directly)."""
        perm = output_permutation(self.pivot_idx, self.out_features)
        self.out_perm = perm.to(self.pivot_idx.device)
        self._cache_nonpivot_idx()

    def nonpivot_index(self) -> torch.Tensor:
        """Ascending int32 non-pivot rows for the fused kernels (non-persistent buffer).

        Derived on first use for layers whose ``pivot_idx`` was never set, then
        kept in sync by ``refresh_permutation``.
        """
        if "nonpivot_idx" not in self._buffers:
            self._cache_nonpivot_idx()
        return self.nonpivot_idx

    def _cache_nonpivot_idx(self) -> None:
        idx = non_pivot_index(self.pivot_idx, self.out_features).to(torch.int32)
        self.register_buffer("nonpivot_idx", idx, persistent=False)

    # ----------------------------------------------------------------- exports
    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rebuild the m x n weight, computed in fp32 (fp64 stays fp64), returned in ``dtype``."""
        packed = packed_factors(self)
        if packed is not None:  # factors kept packed: dequantize them first
            weight, coeff = dequantize_packed(packed.pivot), dequantize_packed(packed.coeff)
        else:
            weight, coeff = self.pivot.weight, self.coeff.weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dense = reconstruct_dense(self.pivot_idx, weight.to(work), coeff.to(work))
        return dense.to(dtype or weight.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same function (for runtimes without PIFA)."""
        weight = self.to_dense()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @property
    def density(self) -> float:
        """Stored parameters / dense parameters (pivot indices and bias not counted)."""
        return density_of_rank(self.out_features, self.in_features, self.rank)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, density={self.density:.3f}, bias={self.bias is not None}"
        )


def validate_pivot_idx(pivot_idx: torch.Tensor, out_features: int, rank: int) -> None:
    """Raise unless ``pivot_idx`` is ``rank`` strictly ascending integers in [0, out_features)."""
    if pivot_idx.dtype.is_floating_point or pivot_idx.dtype == torch.bool:
        raise ValueError(f"pivot_idx must be an integer tensor, got {pivot_idx.dtype}")
    if tuple(pivot_idx.shape) != (rank,):
        raise ValueError(f"pivot_idx must have shape ({rank},), got {tuple(pivot_idx.shape)}")
    idx = pivot_idx.long()
    if rank and (int(idx.min()) < 0 or int(idx.max()) >= out_features):
        raise ValueError(f"pivot_idx values must lie in [0, {out_features}), got out-of-range rows")
    if rank > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("pivot_idx must be strictly ascending (sorted, no duplicates)")


def _check_dims(in_features: int, out_features: int, rank: int) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (
        isinstance(rank, bool)
        or not isinstance(rank, int)
        or not (0 < rank < out_features and rank <= in_features)
    ):
        raise ValueError(
            f"rank {rank!r} is invalid for a {out_features}x{in_features} layer: it needs "
            f"1 <= rank < out_features ({out_features}) and rank <= in_features ({in_features})"
        )


def _refresh_after_load(module: PIFALinear, incompatible_keys) -> None:
    validate_pivot_idx(module.pivot_idx, module.out_features, module.rank)
    module.refresh_permutation()
