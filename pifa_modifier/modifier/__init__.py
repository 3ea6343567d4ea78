"""The llm-compressor integration: ``PIFAModifier`` and its helpers."""

from pifa_modifier.modifier.base import PIFAModifier

__all__ = ["PIFAModifier"]
