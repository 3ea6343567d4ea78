"""PIFA checkpoints: save (atomic, with ``pifa_config``), load, validate, export dense.

The on-disk format is specified in docs/checkpoint-format.md. The format itself
(``metadata``, ``errors``) imports neither llm-compressor nor transformers' loaders,
so a serving runtime (the vLLM plugin) can read it without them; ``install``,
``attach_pifa_save`` and ``export_dense`` are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.metadata import (
    FORMAT_VERSION,
    ModuleSpec,
    build_pifa_config,
    parse_pifa_config,
)

_LAZY = {
    "attach_pifa_save": "pifa_modifier.checkpoint.save",
    "export_dense": "pifa_modifier.checkpoint.export",
    "install": "pifa_modifier.checkpoint.load",
}

__all__ = [
    "FORMAT_VERSION",
    "ModuleSpec",
    "PIFACheckpointError",
    "attach_pifa_save",
    "build_pifa_config",
    "export_dense",
    "install",
    "parse_pifa_config",
]


def __getattr__(name: str) -> Any:
    """Import the llm-compressor/transformers-dependent entry points on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
