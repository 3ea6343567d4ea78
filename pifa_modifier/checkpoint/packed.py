"""Keep quantized PIFA factors packed at run time (compressed-tensors glue).

Why: transformers loads a W4A16/W8A16 PIFA checkpoint with the factors still
packed (int32 ``weight_packed`` + ``weight_scale``), but compressed-tensors
registers a model forward pre-hook (``ct_decompress_hook``) that, on the first
forward, dequantizes every quantized module to float weights -- 4x (int4) or
2x (int8) the memory of the packed factors in fp16. ``PIFALinear`` can compute
from the packed form (``pifa_modifier.kernels.packed``), so ``keep_factors_packed``
replaces that hook with one that decompresses every *other* quantized module.

The loader calls it for ``dequantize=False`` (transformers' default); pass
``quantization_config=CompressedTensorsConfig(dequantize=True)`` to
``from_pretrained`` for float factors instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pifa_modifier.kernels.packed import packed_factors, packed_weight, supported_scheme
from pifa_modifier.module import PIFALinear

__all__ = ["keep_factors_packed", "keeps_factors_packed", "quantize_factors_rtn"]

_MARK = "_pifa_keep_packed"
_HOOK_NAMES = ("ct_decompress_hook", "pifa_decompress_hook")
_FLOAT_STATES = ("frozen", "decompressed")
# what a float-state child may hold (a weight_g_idx, say, is not packable here)
_FLOAT_PARAMS = frozenset({"weight", "weight_scale", "weight_zero_point", "weight_shape"})


def keep_factors_packed(model: nn.Module) -> int:
    """Keep ``model``'s supported quantized PIFA factors packed; return how many layers are.

    1. Factors that still hold float weights next to their scales (status
       ``frozen`` after GPTQ in memory, or ``decompressed``) are packed with
       compressed-tensors' own compressor: exact, the weights lie on the grid.
    2. A pending ``ct_decompress_hook`` is replaced by ``pifa_decompress_hook``,
       which decompresses every other quantized module the same way and leaves
       the packed factors alone.

    Idempotent. Marks the model so that PIFA's save wrapper re-applies step 2
    after a save (compressed-tensors registers its hook again then).
    """
    from compressed_tensors.compressors.base import compress_module

    count = 0
    for layer in model.modules():
        if not isinstance(layer, PIFALinear):
            continue
        children = (layer.pivot, layer.coeff)
        dims = ((layer.in_features, layer.rank), (layer.rank, layer.out_features - layer.rank))
        if all(_packable(child, *d) for child, d in zip(children, dims, strict=True)):
            for child in children:
                if getattr(child, "quantization_status", None) in _FLOAT_STATES:
                    compress_module(child)
        count += packed_factors(layer) is not None
    if count:
        setattr(model, _MARK, True)
        if _remove_decompress_hooks(model):
            _register_hook(model)
    return count


def keeps_factors_packed(model: nn.Module) -> bool:
    """Whether ``keep_factors_packed`` was applied to ``model`` (the save wrapper asks)."""
    return bool(getattr(model, _MARK, False))


def quantize_factors_rtn(
    layer: PIFALinear, num_bits: int = 4, group_size: int | None = 128
) -> None:
    """Round-to-nearest symmetric int quantization of a float layer's factors, packed in place.

    For benchmarks and tests: the same layout GPTQ + ``save_pretrained`` produce,
    without calibration (GPTQ gives the better factors). ``group_size=None``:
    one scale per output row.
    """
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_module_for_quantization,
    )

    strategy = "channel" if group_size is None else "group"
    args = QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=True, strategy=strategy, group_size=group_size
    )
    q_max = 2 ** (num_bits - 1) - 1
    for child in (layer.pivot, layer.coeff):
        in_features = child.weight.shape[1]
        group = in_features if group_size is None else group_size
        if in_features % group:
            raise ValueError(f"group_size {group} does not divide in_features {in_features}")
        initialize_module_for_quantization(
            child, QuantizationScheme(targets=["Linear"], weights=args)
        )
        with torch.no_grad():
            absmax = child.weight.float().unflatten(-1, (-1, group)).abs().amax(-1)
            dtype = child.weight_scale.dtype
            scale = (absmax / q_max).to(dtype).clamp_min(torch.finfo(dtype).tiny)
            child.weight_scale.copy_(scale.reshape(child.weight_scale.shape))
        child.quantization_status = QuantizationStatus.FROZEN
        compress_module(child)


def _packable(child: nn.Module, in_features: int, out_features: int) -> bool:
    """Packed in the supported form already, or a float weight + scales that pack into it."""
    status = getattr(child, "quantization_status", None)
    if status == "compressed":
        return packed_weight(child, in_features, out_features) is not None
    group = supported_scheme(child)
    params = {name for name, p in child._parameters.items() if p is not None}
    return (
        status in _FLOAT_STATES
        and group is not None
        and in_features % (group or in_features) == 0
        and {"weight", "weight_scale"} <= params <= _FLOAT_PARAMS
        and tuple(child.weight.shape) == (out_features, in_features)
    )


def _remove_decompress_hooks(model: nn.Module) -> bool:
    """Drop every lazy-decompression pre-hook of ``model``; whether there was one."""
    found = False
    for hook_id, hook in list(model._forward_pre_hooks.items()):
        if getattr(hook, "__name__", None) in _HOOK_NAMES:
            del model._forward_pre_hooks[hook_id]
            model._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            found = True
    vars(model).pop("ct_decompress_hook", None)
    return found


def _register_hook(model: nn.Module) -> None:
    def pifa_decompress_hook(module: nn.Module, args: tuple) -> None:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.offload.utils import as_single_threaded

        _remove_decompress_hooks(module)
        with _hidden_from_compressed_tensors(_packed_children(module)), as_single_threaded():
            # no config: only the modules' own schemes decide, nothing else is updated
            ModelCompressor().decompress_model(module)

    # stored where compressed-tensors looks for its own handle (remove_decompression_hook)
    model.ct_decompress_hook = model.register_forward_pre_hook(pifa_decompress_hook)


def _packed_children(model: nn.Module) -> list[nn.Module]:
    return [
        child
        for layer in model.modules()
        if isinstance(layer, PIFALinear) and packed_factors(layer) is not None
        for child in (layer.pivot, layer.coeff)
    ]


@contextlib.contextmanager
def _hidden_from_compressed_tensors(children: list[nn.Module]) -> Iterator[None]:
    """compressed-tensors treats a module without ``quantization_scheme`` as unquantized."""
    schemes = [vars(child).pop("quantization_scheme") for child in children]
    try:
        yield
    finally:
        for child, scheme in zip(children, schemes, strict=True):
            child.quantization_scheme = scheme
