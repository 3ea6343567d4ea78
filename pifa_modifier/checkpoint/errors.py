"""The one exception type a damaged or mismatched PIFA checkpoint raises."""

from __future__ import annotations

__all__ = ["PIFACheckpointError"]


class PIFACheckpointError(ValueError):
    """A PIFA checkpoint (or the model being saved as one) is inconsistent.

    Messages start with the module or tensor concerned, so a user can find the
    broken entry in ``config.json`` or the safetensors files.
    """
