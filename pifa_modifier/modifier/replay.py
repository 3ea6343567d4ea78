"""Replaying one decoder layer on the dense and the compressed stream.

llm-compressor's sequential pipeline only propagates the compressed stream and
keeps no activations for modifiers. M needs the dense model's inputs too, so
PIFAModifier caches each decoder layer's call arguments (compressed stream) and
keeps its own dense hidden states; at the layer's epoch end it replays the
layer on both, capturing the inputs of the linears it is about to compress.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pifa_modifier.module import PIFALinear

__all__ = [
    "CachedCall",
    "GroupStats",
    "capture_inputs",
    "dense_mode",
    "discover_groups",
    "layer_output",
]

RegisterHook = Callable[[nn.Module, Callable[..., Any]], Any]


class _EarlyStop(Exception):
    """Raised from a hook once every needed input was captured (skips the rest)."""


@dataclass
class CachedCall:
    """A decoder layer's positional and keyword arguments for one batch."""

    args: tuple
    kwargs: dict

    @classmethod
    def record(cls, args: tuple, kwargs: dict, device: torch.device) -> CachedCall:
        return cls(_to(args, device), _to(dict(kwargs), device))

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> CachedCall:
        if self.args:
            return CachedCall((hidden, *self.args[1:]), self.kwargs)
        return CachedCall(self.args, {**self.kwargs, "hidden_states": hidden})

    def run(self, layer: nn.Module, device: torch.device) -> Any:
        return layer(*_to(self.args, device), **_to(self.kwargs, device))


@dataclass
class GroupStats:
    """Second moments of one group's shared input (float32, n x n).

    Without ``paired`` only the dense stream's ``h_old`` is kept (enough for a
    whitened SVD without M, at half the replay cost).
    """

    h_old: torch.Tensor
    h_new: torch.Tensor | None
    cross: torch.Tensor | None  # K = sum x_old x_new^T
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device, paired: bool = True) -> GroupStats:
        def z() -> torch.Tensor:
            return torch.zeros(n, n, dtype=torch.float32, device=device)

        return cls(z(), z() if paired else None, z() if paired else None)

    def add(self, x_old: torch.Tensor, x_new: torch.Tensor | None, where: str) -> None:
        n = self.h_old.shape[0]
        xo = x_old.reshape(-1, n).to(self.h_old.device, torch.float32)
        streams = [("dense", xo)]
        if self.h_new is not None:
            xn = x_new.reshape(-1, n).to(self.h_old.device, torch.float32)
            if xo.shape != xn.shape:
                raise ValueError(
                    f"{where}: the dense and compressed streams fed {xo.shape[0]} and "
                    f"{xn.shape[0]} tokens; data-dependent routing (MoE) is not supported"
                )
            streams.append(("compressed", xn))
        for name, x in streams:
            if not torch.isfinite(x).all():
                raise ValueError(
                    f"{where}: non-finite activations on the {name} stream; the model "
                    "overflows on the calibration data (calibrate in float32/bfloat16)"
                )
        self.h_old.addmm_(xo.T, xo)
        if self.h_new is not None:
            self.h_new.addmm_(xn.T, xn)
            self.cross.addmm_(xo.T, xn)
        self.tokens += xo.shape[0]


def capture_inputs(
    layer: nn.Module,
    call: CachedCall,
    modules: Sequence[nn.Module],
    register: RegisterHook,
    remove: Callable[[set], None],
    device: torch.device,
    stop_early: bool = True,
) -> tuple[list[torch.Tensor], Any]:
    """Inputs of ``modules`` during one layer call (in the order given), and the output.

    With ``stop_early`` the forward is aborted once all inputs were seen (output None).
    """
    captured: dict[nn.Module, torch.Tensor] = {}
    output = None

    def hook(module: nn.Module, args: tuple) -> None:
        captured[module] = args[0]
        if stop_early and len(captured) == len(modules):
            raise _EarlyStop

    handles = {register(module, hook) for module in modules}
    try:
        output = call.run(layer, device)
    except _EarlyStop:
        pass
    finally:
        remove(handles)
    missing = [m for m in modules if m not in captured]
    if missing:
        raise ValueError(
            f"{len(missing)} target linear(s) were not called by their decoder layer's "
            "forward; PIFAModifier can only compress linears the layer runs"
        )
    return [captured[m] for m in modules], output


def discover_groups(
    layer: nn.Module,
    call: CachedCall,
    modules: Sequence[nn.Module],
    register: RegisterHook,
    remove: Callable[[set], None],
    device: torch.device,
) -> list[list[nn.Module]]:
    """Targets in call order, grouped where they consume the very same input tensor.

    This recovers q/k/v -> o -> gate/up -> down for any architecture, without
    relying on module names.
    """
    order: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if all(module is not seen for seen, _ in order):
            order.append((module, args[0]))

    handles = {register(module, hook) for module in modules}
    try:
        call.run(layer, device)
    finally:
        remove(handles)
    if len(order) != len(modules):
        raise ValueError(
            "some target linears were not called by their decoder layer's forward; "
            "PIFAModifier can only compress linears the layer runs"
        )
    groups: list[list[nn.Module]] = []
    last_input: torch.Tensor | None = None
    for module, inp in order:
        if last_input is not None and inp is last_input:
            groups[-1].append(module)
        else:
            groups.append([module])
        last_input = inp
    return groups


@contextlib.contextmanager
def dense_mode(dense_weights: dict[PIFALinear, torch.Tensor]) -> Iterator[None]:
    """Temporarily run already-factorized layers with their original dense weights."""
    for module, weight in dense_weights.items():
        module.dense_weight = weight
    try:
        yield
    finally:
        for module in dense_weights:
            module.dense_weight = None


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (tensor or first tuple entry)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
