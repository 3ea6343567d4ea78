"""benchmarks/quality.py and plot_quality.py: method registry, +w4a16 stages, results files."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import calibration_dataset, make_wide_llama
from llmcompressor.recipe import Recipe

import pifa_modifier  # noqa: F401
from pifa_modifier import PIFALinear
from pifa_modifier.eval.assets import sharegpt_text

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load("quality")
plot_quality = _load("plot_quality")
ARGS = argparse.Namespace(density=0.5, num_layers=1)
WINDOWS = torch.tensor(calibration_dataset(num=8)["input_ids"])


def test_every_baseline_has_a_w4a16_variant():
    for base in ("svd", "svdllm", "mpifa", "mpifa_best", "sparsegpt24", "wanda24"):
        assert f"{base}+w4a16" in quality.METHODS
    assert {"svd", "svdllm", "mpifa", "mpifa_best", "mpifa+w4a16"} <= quality.SWEEPS
    assert not {"dense", "sparsegpt24", "wanda24+w4a16", "mpifa_w4a16"} & quality.SWEEPS
    assert quality.entry_name("mpifa", 0.7) == "mpifa@0.7"
    assert quality.entry_name("mpifa+w4a16", 0.5) == "mpifa+w4a16"
    assert quality.entry_name("wanda24", 0.7) == "wanda24"


@pytest.mark.parametrize("name", sorted(quality.METHODS))
def test_method_recipes_parse(name: str):
    recipe = quality.METHODS[name](ARGS)
    if recipe is None:
        assert name == "dense"
        return
    text = Path(recipe).read_text() if isinstance(recipe, str) else yaml.safe_dump(recipe)
    built = Recipe.create_instance(text)
    assert built.modifiers
    if name.endswith("+w4a16"):  # the base method's stages, then one quantization stage
        base = quality.METHODS[name.removesuffix("+w4a16")](ARGS)
        assert list(recipe) == [*base, "quant_stage"]


def test_two_four_with_w4a16_keeps_the_mask(tmp_path: Path):
    model = quality.run_oneshot(
        make_wide_llama(tmp_path / "base"), WINDOWS, quality.METHODS["wanda24+w4a16"](ARGS)
    )
    weights = [m.weight for n, m in model.named_modules() if n.endswith("_proj")]
    assert len(weights) == 7
    for w in weights:
        assert ((w.reshape(-1, 4) != 0).sum(-1) <= 2).all()  # still 2:4 after rounding
    assert quality.zero_fraction(model) >= 0.5


def test_pifa_with_w4a16_keeps_ranks_and_reloads_exactly(tmp_path: Path):
    def ranks(name: str, sub: str) -> tuple[torch.nn.Module, dict[str, int]]:
        model = quality.run_oneshot(
            make_wide_llama(tmp_path / sub), WINDOWS, quality.METHODS[name](ARGS)
        )
        return model, {n: m.rank for n, m in model.named_modules() if isinstance(m, PIFALinear)}

    _, fp_ranks = ranks("mpifa", "fp")
    model, q_ranks = ranks("mpifa+w4a16", "q")
    assert q_ranks == fp_ranks and len(q_ranks) == 7
    probe = torch.randint(3, 256, (1, 24))
    stats = quality.checkpoint_stats(model.eval(), probe, compressed=True)
    assert stats["reload_max_abs_logit_diff"] == 0.0
    assert 0 < stats["weights_bytes"] <= stats["checkpoint_bytes"]


@pytest.mark.parametrize("density", [0.4, 0.5, 0.8])
def test_best_settings_keep_the_total_density(density: float):
    args = argparse.Namespace(density=density, num_layers=30)
    fields = quality.METHODS["mpifa_best"](args)["pifa_stage"]["pifa_modifiers"]["PIFAModifier"]
    ((pattern, tail),) = fields["densities"].items()
    assert pattern == r"re:.*layers\.(26|27|28|29)\..*"
    assert tail > density > fields["density"]
    assert 26 * fields["density"] + 4 * tail == pytest.approx(30 * density, abs=1e-3)
    assert fields["reconstruct_steps"] == 4
    small = quality.METHODS["mpifa_best"](argparse.Namespace(density=0.5, num_layers=3))
    assert "densities" not in small["pifa_stage"]["pifa_modifiers"]["PIFAModifier"]


def test_markdown_table_rows():
    table = quality.markdown_table(
        {
            "mpifa@0.7": {
                "ppl": 20.0,
                "ppl_ood": 30.5,
                "density": 0.69,
                "compress_wall_s": 12.3,
                "peak_rss_compress_mib": 900.0,
                "checkpoint_bytes": 2e6,
                "reload_max_abs_logit_diff": 0.0,
            },
            "svd": {
                "ppl": 6.7e7,
                "compress_wall_s": 3.0,
                "peak_rss_compress_mib": 800.0,
            },
            "wanda24": {"error": "worker exited with status 1"},
        }
    ).splitlines()
    assert table[2] == "| mpifa@0.7 | 20.00 | 30.50 | 0.6900 | 12 | 900 | 2.0 | 0 |"
    assert table[3] == "| svd | 6.70e+07 |  | 1 | 3 | 800 |  |  |"
    assert table[4].startswith("| wanda24 | worker exited with status 1 |")


def test_table_groups_methods_and_sorts_densities():
    entries = dict.fromkeys(["mpifa@0.7", "svd", "mpifa", "dense", "mpifa@0.4", "other"], {})
    assert list(quality.sorted_entries(entries)) == [
        "dense", "svd", "mpifa@0.4", "mpifa", "mpifa@0.7", "other",
    ]  # fmt: skip


def test_table_needs_a_results_file(tmp_path: Path):
    with pytest.raises(SystemExit, match="no results yet"):
        quality.main(["--table", "--results", str(tmp_path / "none.json")])


def test_other_protocol_is_refused_not_dropped(tmp_path: Path, monkeypatch):
    results = tmp_path / "r.json"
    stored = {"protocol": {"calibration_samples": 128}, "methods": {"dense": {"ppl": 14.1}}}
    results.write_text(json.dumps(stored))
    monkeypatch.setitem(quality.MODELS, "smollm2", (lambda: tmp_path, "stand-in"))
    monkeypatch.setattr(quality, "spawn", lambda *a: pytest.fail("must not run"))
    with pytest.raises(SystemExit, match="other protocol settings"):
        quality.main(["--methods", "dense", "--num-samples", "8", "--results", str(results)])
    assert json.loads(results.read_text()) == stored


def test_density_flag_refuses_fixed_methods():
    with pytest.raises(SystemExit, match="drop \\['wanda24'\\]"):
        quality.main(["--methods", "mpifa", "wanda24", "--density", "0.7"])


def test_plot_curves_and_png(tmp_path: Path):
    methods = {
        "dense": {"ppl": 14.0, "ppl_ood": 9.0, "checkpoint_bytes": 5e8},
        "wanda24": {"ppl": 120.0, "zero_fraction": 0.5, "checkpoint_bytes": 5e8},
        "gptq_w4a16": {"ppl": 18.0, "zero_fraction": 0.15},  # rounding zeros are kept
        "mpifa": {"ppl": 70.0, "ppl_ood": 40.0, "density": 0.49, "checkpoint_bytes": 3e8},
        "mpifa@0.8": {"ppl": 20.0, "ppl_ood": 15.0, "density": 0.79},
        "failed": {"error": "worker exited with status 1"},
    }
    assert plot_quality.curves(methods, "ppl", "density") == {
        "dense": [(1.0, 14.0)],
        "gptq_w4a16": [(1.0, 18.0)],
        "mpifa": [(0.49, 70.0), (0.79, 20.0)],
        "wanda24": [(0.5, 120.0)],
    }
    assert plot_quality.curves(methods, "ppl", "checkpoint_mb")["mpifa"] == [(300.0, 70.0)]
    pytest.importorskip("matplotlib")
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"protocol": {}, "methods": methods}))
    out = tmp_path / "p.png"
    assert plot_quality.main([str(results), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_quality.main([str(tmp_path / "none.json"), "--out", str(out)]) == 2


def _chat(value: str) -> dict:
    return {"id": "x", "conversations": [{"from": "human", "value": value}, {"value": "ok"}]}


def test_sharegpt_text_reads_a_truncated_file_record_by_record(tmp_path: Path):
    records = [_chat("Hello there, how are you?"), _chat("Привет, как дела?"), _chat("Second")]
    body = ",\n".join(json.dumps(r) for r in records)
    path = tmp_path / "sg.json"
    path.write_text("[\n" + body + ',\n{"id": "cut", "conver', encoding="utf-8")
    text = sharegpt_text(30, path)
    assert text == "Hello there, how are you?\n\nok\n\nSecond\n\nok"  # Cyrillic chat left out
    with pytest.raises(ValueError, match="characters of English chat, 1000 asked"):
        sharegpt_text(1000, path)
