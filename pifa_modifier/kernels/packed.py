"""Quantized PIFA factors kept packed at run time (torch only; never imports triton).

What a reloaded W4A16/W8A16 PIFA checkpoint holds (compressed-tensors 0.19,
format ``pack-quantized``, symmetric int, ``group`` or ``channel`` strategy):
``pivot`` and ``coeff`` stay plain ``nn.Linear`` children with status
``compressed``, no ``weight``, and three parameters:

* ``weight_packed`` int32 (N, ceil(K * b / 32)): the b-bit values of a row,
  offset to unsigned (``q + 2**(b-1)``) and packed along K, LSB first: element
  k sits in word ``k // (32 // b)`` at bit ``(k % (32 // b)) * b`` (b = 4: 8 per
  word, b = 8: 4 per word; W8A16 is packed the same way, not stored as int8);
* ``weight_scale`` (N, K // group_size) in the model's dtype ((N, 1) per channel);
  the zero point is 0 and not stored;
* ``weight_shape`` int64 (2,) = (N, K).

The weight is ``q.to(scale.dtype) * scale[n, k // group_size]``. transformers
loads these tensors packed, but (with the default ``dequantize=False``) registers
a model pre-hook that decompresses every quantized module to float weights on the
first forward. ``pifa_modifier.checkpoint.packed.keep_factors_packed`` exempts the
factors this module recognises, and ``PIFALinear`` then computes from the packed
tensors: fused dequantizing kernels on CUDA, otherwise each child's own forward on
a weight dequantized for that call only (bit-identical to the decompressed model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from pifa_modifier.module import PIFALinear

__all__ = [
    "SUPPORTED_BITS",
    "PackedFactors",
    "PackedWeight",
    "dequantize_packed",
    "packed_factors",
    "packed_weight",
    "supported_scheme",
    "unpack_int32",
]

SUPPORTED_BITS = (4, 8)
_PACKED_PARAMS = frozenset({"weight_packed", "weight_scale", "weight_shape"})
_STRATEGIES = ("group", "channel")


class PackedWeight(NamedTuple):
    """One factor in compressed-tensors' ``pack-quantized`` layout (tensors are not copied)."""

    packed: torch.Tensor  # int32 (out_features, ceil(in_features * num_bits / 32))
    scale: torch.Tensor  # (out_features, in_features // group_size)
    num_bits: int  # 4 or 8
    group_size: int  # divides in_features; in_features for one group per row (channel)
    in_features: int
    out_features: int


class PackedFactors(NamedTuple):
    pivot: PackedWeight  # P: (rank, in_features)
    coeff: PackedWeight  # C: (out_features - rank, rank)


def supported_scheme(child: nn.Module) -> int | None:
    """Group size (0 for per-channel) if ``child``'s scheme is one this runtime handles, else None.

    Weight-only, symmetric, int4/int8, group or channel strategy, no activation
    ordering by group (it would need ``g_idx``), ``pack-quantized`` format (or no
    format chosen yet). Looks at the scheme only, not at the tensors.
    """
    scheme = getattr(child, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    if weights is None or scheme.input_activations is not None:
        return None
    if scheme.output_activations is not None:
        return None
    if getattr(scheme, "format", None) not in (None, "pack-quantized"):
        return None
    if weights.type != "int" or not weights.symmetric or weights.num_bits not in SUPPORTED_BITS:
        return None
    if weights.dynamic or weights.actorder in ("group", "dynamic"):
        return None
    if weights.strategy not in _STRATEGIES or getattr(weights, "block_structure", None):
        return None
    if weights.strategy == "channel":
        return 0
    return (
        weights.group_size
        if isinstance(weights.group_size, int) and weights.group_size > 0
        else None
    )


def packed_weight(child: nn.Module, in_features: int, out_features: int) -> PackedWeight | None:
    """``child``'s packed weight, if it is a compressed, supported ``(in, out)`` factor, else None.

    Checks structure and shapes only (no tensor values: that would sync the GPU on
    every forward). The first test is a plain attribute read, so float layers pay
    nothing more.
    """
    if getattr(child, "quantization_status", None) != "compressed":
        return None
    if type(child) is not nn.Linear or child._buffers:
        return None
    params = {name: p for name, p in child._parameters.items() if p is not None}
    if params.keys() != _PACKED_PARAMS:  # a weight_g_idx or weight_zero_point: not ours
        return None
    group = supported_scheme(child)
    if group is None:
        return None
    bits = child.quantization_scheme.weights.num_bits
    packed, scale = params["weight_packed"], params["weight_scale"]
    words = -(-in_features * bits // 32)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out_features, words):
        return None
    if not scale.is_floating_point() or scale.ndim != 2 or scale.shape[0] != out_features:
        return None
    if group == 0 or scale.shape[1] == 1:
        group = in_features
    if in_features % group or scale.shape[1] != in_features // group:
        return None
    return PackedWeight(packed, scale, bits, group, in_features, out_features)


def packed_factors(layer: PIFALinear) -> PackedFactors | None:
    """Both factors of ``layer`` in the supported packed form, or None (float or anything else)."""
    pivot = packed_weight(layer.pivot, layer.in_features, layer.rank)
    if pivot is None:
        return None
    coeff = packed_weight(layer.coeff, layer.rank, layer.out_features - layer.rank)
    if coeff is None:
        return None
    return PackedFactors(pivot, coeff)


def unpack_int32(packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """Signed int8 (N, in_features) from compressed-tensors' int32 packing (4 or 8 bits).

    Equal to ``compressed_tensors``' ``unpack_from_int32`` for these widths, with
    shifts instead of its general (word-straddling) gather.
    """
    if num_bits not in SUPPORTED_BITS:
        raise ValueError(f"num_bits must be one of {SUPPORTED_BITS}, got {num_bits}")
    shifts = torch.arange(0, 32, num_bits, device=packed.device, dtype=torch.int32)
    # arithmetic shifts of negative words only smear the sign bit above the mask
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    values = values.flatten(-2)[..., :in_features]
    return (values - (1 << (num_bits - 1))).to(torch.int8)


def dequantize_packed(weight: PackedWeight) -> torch.Tensor:
    """The float weight, in the scale's dtype: bit-identical to compressed-tensors' decompress."""
    q = unpack_int32(weight.packed, weight.num_bits, weight.in_features)
    scale = weight.scale
    groups = q.to(scale.dtype).unflatten(-1, (scale.shape[-1], -1))
    return (groups * scale.unsqueeze(-1)).flatten(-2)
