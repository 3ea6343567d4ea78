"""When ``PIFALinear`` may use the fused Triton kernels (torch only; never imports triton).

The kernels read ``pivot.weight`` / ``coeff.weight`` directly and skip the
children's ``forward``. That is only equivalent to the torch path when the
children are plain float ``nn.Linear`` layers nobody is watching: quantized or
fake-quantized children (compressed-tensors swaps ``forward`` and adds
``weight_scale`` & co.), calibration hooks (GPTQ, observers) and autograd all
need the torch path, so every doubt answers "no".

Factors kept packed by compressed-tensors (int4/int8, see
``pifa_modifier.kernels.packed``) have their own check, ``supports_quantized_module``,
under the same rule, and their own kernels (``triton_pifa_quant``).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from pifa_modifier.kernels.packed import PackedFactors, PackedWeight, packed_factors

if TYPE_CHECKING:
    from pifa_modifier.module import PIFALinear

__all__ = [
    "pifa_forward",
    "pifa_quant_forward",
    "supports_module",
    "supports_quantized_module",
    "triton_available",
    "use_triton_kernels",
    "use_triton_quant_kernels",
]

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
    for child in (layer.pivot, layer.coeff):
        if type(child) is not nn.Linear or child.bias is not None or child._buffers:
            return False
        if child._parameters.keys() != _LINEAR_PARAMS or not _QUANT_ATTRS.isdisjoint(vars(child)):
            return False
        if "forward" in vars(child) or child._forward_hooks or child._forward_pre_hooks:
            return False
    params = [layer.pivot.weight, layer.coeff.weight]
    if layer.bias is not None:
        params.append(layer.bias)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return layer.pivot_idx.device == x.device and all(
        type(p.data) is torch.Tensor and p.dtype == x.dtype and p.device == x.device for p in params
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


def _compressed_tensors_forward(child: nn.Module) -> bool:
    """Whether ``child`` runs ``nn.Linear.forward`` under compressed-tensors' wrappers only.

    Two wrappers are expected on loaded factors, both ``functools.wraps``-ed to look
    like ``Linear.forward`` (their code objects tell them apart from any other
    override): the weight-only ``quantized_forward`` (``set_forward_quantized``),
    and the offload wrapper (``offload_module``, applied to every module by the
    first forward's decompression), which only moves inputs to the onload device
    and calls ``_original_forward_func``.
    """
    forward = vars(child).get("forward")
    if forward is None:
        return True
    if getattr(forward, "__self__", None) is not child:
        return False
    func = getattr(forward, "__func__", None)
    if _ct_code(func, "forward", "offload"):
        func = vars(child).get("_original_forward_func")
        if func is nn.Linear.forward:
            return True
    return _ct_code(func, "quantized_forward", "quantization")


def _ct_code(func: object, name: str, package: str) -> bool:
    """``func`` is the function ``name`` defined in ``compressed_tensors/<package>/``."""
    code = getattr(func, "__code__", None)
    return (
        code is not None
        and code.co_name == name
        and f"compressed_tensors{os.sep}{package}{os.sep}" in code.co_filename
    )


def supports_quantized_module(
    layer: PIFALinear, x: torch.Tensor, factors: PackedFactors | None = None
) -> bool:
    """Whether the packed-factor kernels compute what ``layer``'s torch path would on ``x``.

    Device-independent. Both children hold a supported packed weight (``factors``,
    looked up when not given), run no forward override but compressed-tensors'
    weight-only wrapper and no hooks; scales, bias and indices live on ``x``'s
    device, scales and bias in ``x``'s dtype; no autograd graph to record.
    """
    factors = factors if factors is not None else packed_factors(layer)
    if factors is None:
        return False
    floats = [factors.pivot.scale, factors.coeff.scale]
    if layer.bias is not None:
        floats.append(layer.bias)
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in floats)):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for child in (layer.pivot, layer.coeff):
        if child._forward_hooks or child._forward_pre_hooks:
            return False
        if not _compressed_tensors_forward(child):
            return False
    packed = [factors.pivot.packed, factors.coeff.packed]
    return (
        layer.pivot_idx.device == x.device
        and all(type(t.data) is torch.Tensor and t.device == x.device for t in floats + packed)
        and all(t.dtype == x.dtype for t in floats)
    )


def use_triton_quant_kernels(
    layer: PIFALinear, x: torch.Tensor, factors: PackedFactors | None = None
) -> bool:
    """``use_triton_kernels`` for packed factors: CUDA input, kernels usable, not tracing."""
    if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or not x.is_cuda:
        return False
    return triton_available(x) and supports_quantized_module(layer, x, factors)


def pifa_quant_forward(
    x: torch.Tensor,
    pivot: PackedWeight,
    coeff: PackedWeight,
    pivot_idx: torch.Tensor,
    nonpivot_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused packed-factor forward (``triton_pifa_quant``); imports triton on first use."""
    from pifa_modifier.kernels.triton_pifa_quant import pifa_quant_forward as fused

    return fused(x, pivot, coeff, pivot_idx, nonpivot_idx, bias)
