"""Fused GPU forward for ``PIFALinear`` (Triton), with a torch-only dispatcher.

Triton is optional: importing this package never imports it; ``pifa_forward``
loads ``pifa_modifier.kernels.triton_pifa`` (and ``pifa_quant_forward``
``triton_pifa_quant``) on first call.
"""

from pifa_modifier.kernels.dispatch import (
    pifa_forward,
    pifa_quant_forward,
    supports_module,
    supports_quantized_module,
    triton_available,
    use_triton_kernels,
    use_triton_quant_kernels,
)
from pifa_modifier.kernels.packed import (
    PackedFactors,
    PackedWeight,
    dequantize_packed,
    packed_factors,
    unpack_int32,
)

__all__ = [
    "PackedFactors",
    "PackedWeight",
    "dequantize_packed",
    "packed_factors",
    "pifa_forward",
    "pifa_quant_forward",
    "supports_module",
    "supports_quantized_module",
    "triton_available",
    "unpack_int32",
    "use_triton_kernels",
    "use_triton_quant_kernels",
]
