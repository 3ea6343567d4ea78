"""pifa-modifier: MPIFA low-rank compression (Pivoting Factorization) for llm-compressor.

Importing this package registers ``PIFAModifier`` with llm-compressor's
``ModifierFactory`` so YAML recipes can name it, and guards recipe parsing.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from pifa_modifier.checkpoint import install as _install_checkpoint_loader
from pifa_modifier.math import density_of_rank, pivot_factorize, rank_for_density
from pifa_modifier.modifier import PIFAModifier
from pifa_modifier.module import PIFALinear
from pifa_modifier.recipe import install_recipe_guard

__version__ = "0.1.0"

__all__ = [
    "PIFALinear",
    "PIFAModifier",
    "density_of_rank",
    "pivot_factorize",
    "rank_for_density",
]

ModifierFactory.register(PIFAModifier.__name__, PIFAModifier)
install_recipe_guard()
_install_checkpoint_loader()
