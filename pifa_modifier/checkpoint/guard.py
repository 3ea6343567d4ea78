"""Make plain transformers refuse a PIFA checkpoint instead of loading random weights.

Without the plugin, transformers builds the dense architecture, reports the
``pivot``/``coeff`` tensors as unexpected and the dense weights as missing, and
returns a randomly initialised model with only a warning. So config.json
carries ``transformers_weights`` (the config key transformers reads to pick the
weights file) set to an explanation that is not a safetensors file name:
transformers then raises ``ValueError`` quoting it, before building anything.
Other runtimes (vLLM, compressed-tensors) do not read the key. The plugin's
quantizer removes it from the in-memory config before transformers resolves
the weights files (see ``release_guard``).
"""

from __future__ import annotations

from typing import Any

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.metadata import CONFIG_KEY

__all__ = ["GUARD_KEY", "GUARD_VALUE", "release_guard"]

GUARD_KEY = "transformers_weights"
_GUARD_PREFIX = "PIFA checkpoint"
GUARD_VALUE = (
    f"{_GUARD_PREFIX} (see pifa_config in config.json): its layers are stored as PIFA factors "
    "and load correctly only with the pifa_modifier plugin. Install pifa-modifier and "
    "`import pifa_modifier` before from_pretrained, or convert it to a plain dense checkpoint "
    "with `pifa export-dense SRC DST`."
)


def release_guard(config: Any) -> None:
    """Drop the guard from a loaded config, so transformers looks up the usual weights files."""
    value = getattr(config, GUARD_KEY, None)
    if not (isinstance(value, str) and value.startswith(_GUARD_PREFIX)):
        return
    if getattr(config, CONFIG_KEY, None) is None:
        raise PIFACheckpointError(
            f"config.json marks a PIFA checkpoint ({GUARD_KEY}) but has no {CONFIG_KEY}: "
            "the checkpoint is damaged, its layer shapes are unknown"
        )
    delattr(config, GUARD_KEY)
