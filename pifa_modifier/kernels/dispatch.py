"""When ``PIFALinear`` may use the fused Triton kernels (torch only; never imports triton).

The kernels read ``pivot.weight`` / ``coeff.weight`` directly and skip the
children's ``forward``. That is only equivalent to the torch path when the
children are plain float ``nn.Linear`` layers nobody is watching: quantized or
fake-quantized children (compressed-tensors swaps ``forward`` and adds
``weight_scale`` & co.), calibration hooks (GPTQ, observers) and autograd all
need the torch path, so every doubt answers "no".
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pifa_modifier.module import PIFALinear

__all__ = ["pifa_forward", "supports_module", "triton_available", "use_triton_kernels"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_LINEAR_PARAMS = {"weight", "bias"}
# Set on modules that compressed-tensors / llm-compressor quantize (or will): scales,
# zero points and packed weights are extra parameters, caught by _LINEAR_PARAMS.
_QUANT_ATTRS = frozenset({"quantization_scheme", "quantization_status"})


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _capability_ok(device_index: int) -> bool:
    """bf16 ``tl.dot`` and the tuned configs assume Ampere (sm_80) or newer."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def triton_available(x: torch.Tensor, *, interpreter: bool = False) -> bool:
    """Whether the Triton kernels can run on ``x``.

    True when triton imports and ``x`` is an fp16/bf16 CUDA tensor on sm_80+, or,
    only if the caller passes ``interpreter=True``, when ``TRITON_INTERPRET=1`` is
    set and ``x`` is a float CPU tensor (the variable must have been set before
    triton was imported: triton decides process-wide).
    """
    if not _triton_importable():
        return False
    if x.is_cuda:
        return x.dtype in _HALF_DTYPES and _capability_ok(x.device.index or 0)
    return (
        interpreter
        and os.environ.get("TRITON_INTERPRET") == "1"
        and x.device.type == "cpu"
        and x.dtype in (*_HALF_DTYPES, torch.float32)
    )


def supports_module(layer: PIFALinear, x: torch.Tensor) -> bool:
    """Whether the kernels compute exactly what ``layer``'s torch forward would on ``x``.

    Device-independent (so it is testable on CPU): plain, unhooked, unquantized
    ``nn.Linear`` children whose weights, like the bias and indices, live on
    ``x``'s device in ``x``'s dtype, and no autograd graph to record.
    """
    params = [layer.pivot.weight, layer.coeff.weight]
    if layer.bias is not None:
        params.append(layer.bias)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for child in (layer.pivot, layer.coeff):
        if type(child) is not nn.Linear or child.bias is not None or child._buffers:
            return False
        if child._parameters.keys() != _LINEAR_PARAMS or not _QUANT_ATTRS.isdisjoint(vars(child)):
            return False
        if "forward" in vars(child) or child._forward_hooks or child._forward_pre_hooks:
            return False
    return layer.pivot_idx.device == x.device and all(
        type(p.data) is torch.Tensor and p.dtype == x.dtype and p.device == x.device
        for p in params
    )


def use_triton_kernels(layer: PIFALinear, x: torch.Tensor) -> bool:
    """Dispatch test for ``PIFALinear.forward``: CUDA input, kernels usable, not tracing.

    Returns False for ``torch.fx`` proxies before touching any tensor attribute
    (so symbolic tracing records the torch path) and under ``torch.compile``
    (dynamo cannot trace the launchers' host logic; inductor fuses the torch path).
    """
    if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or not x.is_cuda:
        return False
    return triton_available(x) and supports_module(layer, x)


def pifa_forward(
    x: torch.Tensor,
    pivot_weight: torch.Tensor,
    coeff_weight: torch.Tensor,
    pivot_idx: torch.Tensor,
    nonpivot_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused PIFA forward (see ``triton_pifa.pifa_forward``); imports triton on first use."""
    from pifa_modifier.kernels.triton_pifa import pifa_forward as fused

    return fused(x, pivot_weight, coeff_weight, pivot_idx, nonpivot_idx, bias)
