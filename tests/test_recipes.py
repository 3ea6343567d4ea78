"""Every shipped recipe in recipes/ runs through oneshot and reloads bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import calibration_dataset, make_wide_llama
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

import pifa_modifier  # noqa: F401
from pifa_modifier import PIFALinear

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"mpifa", "mpifa_w4a16", "mpifa_w8a16"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_round_trip(recipe: Path, tmp_path, tokenizer):
    model = make_wide_llama(tmp_path / "base")
    out = tmp_path / "out"
    oneshot(
        model=model,
        dataset=calibration_dataset(num=8),
        recipe=str(recipe),
        processor=tokenizer,
        num_calibration_samples=8,
        max_seq_length=32,
        output_dir=str(out),
        save_compressed=True,
    )
    fields = yaml.safe_load(recipe.read_text())["pifa_stage"]["pifa_modifiers"]["PIFAModifier"]
    layers = [m for m in model.modules() if isinstance(m, PIFALinear)]
    assert len(layers) == 7
    for layer in layers:
        assert layer.rank % fields["rank_multiple"] == 0
        m, n = layer.out_features, layer.in_features
        assert layer.rank * (m + n - layer.rank) <= fields["density"] * m * n

    ids = torch.randint(3, 256, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.isfinite(ref).all()
    assert torch.equal(got, ref)
