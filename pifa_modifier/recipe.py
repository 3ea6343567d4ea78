"""A guard against recipes that silently define no modifiers.

llm-compressor reads only top-level keys ending in ``_stage`` and, inside them,
keys ending in ``_modifiers``; anything else is dropped without a word, and
oneshot then "succeeds" without compressing. After ``import pifa_modifier`` a
non-empty recipe that yields no modifier raises instead.
"""

from __future__ import annotations

from typing import Any

from llmcompressor.recipe import Recipe

__all__ = ["check_recipe_dict", "install_recipe_guard"]

_GUARD_FLAG = "_pifa_guarded"


def check_recipe_dict(recipe_dict: dict[str, Any], recipe: Recipe) -> None:
    """Raise when ``recipe_dict`` has content but ``recipe`` has no modifiers."""
    content = [key for key in recipe_dict if key != "args"]
    if content and not recipe.modifiers:
        raise ValueError(
            f"the recipe defines no modifiers: its top-level keys {content} must end in "
            "'_stage' and hold groups ending in '_modifiers', e.g.\n"
            "pifa_stage:\n  pifa_modifiers:\n    PIFAModifier:\n      density: 0.5"
        )


def install_recipe_guard() -> None:
    """Wrap ``Recipe.from_dict`` once so empty-but-non-trivial recipes fail loudly."""
    original = Recipe.from_dict.__func__
    if getattr(original, _GUARD_FLAG, False):
        return

    def from_dict(cls, recipe_dict: dict[str, Any]) -> Recipe:
        recipe = original(cls, recipe_dict)
        check_recipe_dict(recipe_dict, recipe)
        return recipe

    setattr(from_dict, _GUARD_FLAG, True)
    Recipe.from_dict = classmethod(from_dict)
