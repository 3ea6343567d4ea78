"""PIFA checkpoints: save (atomic, with ``pifa_config``), load, validate, export dense.

The on-disk format is specified in docs/checkpoint-format.md.
"""

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.export import export_dense
from pifa_modifier.checkpoint.load import install
from pifa_modifier.checkpoint.metadata import (
    FORMAT_VERSION,
    ModuleSpec,
    build_pifa_config,
    parse_pifa_config,
)
from pifa_modifier.checkpoint.save import attach_pifa_save

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
