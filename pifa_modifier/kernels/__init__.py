"""Fused GPU forward for ``PIFALinear`` (Triton), with a torch-only dispatcher.

Triton is optional: importing this package never imports it; ``pifa_forward``
loads ``pifa_modifier.kernels.triton_pifa`` on first call.
"""

from pifa_modifier.kernels.dispatch import (
    pifa_forward,
    supports_module,
    triton_available,
    use_triton_kernels,
)

__all__ = ["pifa_forward", "supports_module", "triton_available", "use_triton_kernels"]
