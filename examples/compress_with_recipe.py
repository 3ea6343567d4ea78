"""Compress any local Hugging Face causal LM with a PIFA recipe and save it.

    python examples/compress_with_recipe.py MODEL_DIR OUT_DIR \
        --recipe recipes/mpifa_w4a16.yaml --text calib.txt --samples 128 --seq-len 512

Calibration windows are cut from a local text file (no hub access needed). The
saved directory loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` once
``import pifa_modifier`` has run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

import pifa_modifier  # noqa: F401  (registers PIFAModifier and the checkpoint loader)
from pifa_modifier.eval import calibration_dataset, calibration_windows, tokenize_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/mpifa.yaml"))
    parser.add_argument("--text", type=Path, required=True, help="calibration text file")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize_text(tokenizer, args.text.read_text(encoding="utf-8"))
    windows = calibration_windows(ids, args.samples, args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    oneshot(
        model=model,
        dataset=calibration_dataset(windows),
        recipe=str(args.recipe),
        processor=tokenizer,
        num_calibration_samples=args.samples,
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
        output_dir=str(args.output),
    )
    tokenizer.save_pretrained(args.output)
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
