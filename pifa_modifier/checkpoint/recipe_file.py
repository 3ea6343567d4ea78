"""Make the saved ``recipe.yaml`` replayable.

llm-compressor 0.14 dumps the actorder that GPTQModifier resolves during
initialisation as a Python enum object (``!!python/object/apply:...ActivationOrdering``),
which ``yaml.safe_load`` -- and so ``Recipe.create_instance`` -- refuses. Saving a
PIFA checkpoint rewrites such string enums to their plain value.
"""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["sanitize_recipe_file"]

_APPLY = "tag:yaml.org,2002:python/object/apply:"


class _EnumAsValueLoader(yaml.SafeLoader):
    """Safe loader that reads ``python/object/apply:<Enum>`` of one string as that string."""


def _enum_value(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> str:
    args = loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else None
    if not args or len(args) != 1 or not isinstance(args[0], str):
        raise yaml.constructor.ConstructorError(
            None, None, f"unsupported Python object {suffix!r} in recipe.yaml", node.start_mark
        )
    return args[0]


_EnumAsValueLoader.add_multi_constructor(_APPLY, _enum_value)


def sanitize_recipe_file(path: Path) -> None:
    """Rewrite ``path`` in plain YAML if it holds Python enum tags (no-op otherwise)."""
    if not path.is_file():
        return
    text = path.read_text()
    if "!!python/object/apply:" not in text:
        return
    data = yaml.load(text, Loader=_EnumAsValueLoader)  # noqa: S506 (safe loader subclass)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
