"""Which MPIFA settings beat the paper's at density 0.5 (SmolLM2-135M, a cheap protocol).

Each variant changes PIFAModifier fields against the paper's settings (λ 0.25, 2 ALS steps,
one density everywhere), is compressed from the same calibration windows and scored on the
same wiki test windows. What wins becomes ``mpifa_best`` in ``quality.py``. The protocol
is cheap on purpose (8 calibration, 16 test windows: ≈ 3 min a variant on 2 cores), so
small differences are indications, which ``quality.py`` then checks side by side.

    HF_HUB_OFFLINE=1 python benchmarks/settings_search.py --variants paper steps4 tail
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pifa_modifier import PIFAModifier
from pifa_modifier.demo import pifa_param_counts
from pifa_modifier.eval import (
    calibration_windows,
    oneshot_windows,
    perplexity,
    smollm2_path,
    wiki_token_ids,
)

RESULTS = Path(__file__).resolve().parent / "results" / "settings_search_smollm2.json"
# SmolLM2 has 30 decoder layers; "tail" gives the last 4 density 0.65 and the rest 0.477
VARIANTS: dict[str, dict] = {
    "paper": {},
    "lam0.1": {"old_output_factor": 0.1},
    "lam0.5": {"old_output_factor": 0.5},
    "steps4": {"reconstruct_steps": 4},
    "attn0.8_mlp0.4": {"attn_density": 0.8, "mlp_density": 0.4},
    "attn0.35_mlp0.55": {"attn_density": 0.35, "mlp_density": 0.55},
    "tail": {"density": 0.477, "densities": {r"re:.*layers\.(26|27|28|29)\..*": 0.65}},
}


def run_variant(
    name: str, args: argparse.Namespace, windows: torch.Tensor, test_ids: torch.Tensor
) -> dict:
    """Compress a fresh model with the variant's fields and score it."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    fields = {"density": 0.5, "rank_multiple": 8, "ignore": ["lm_head"], **VARIANTS[name]}
    compress_s = oneshot_windows(model, windows, PIFAModifier(**fields))
    dense, kept = pifa_param_counts(model)
    ppl = perplexity(model, test_ids, args.seq_len, args.eval_windows).ppl
    return {"fields": VARIANTS[name], "ppl": ppl, "density": kept / dense, "compress_s": compress_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    train_ids, test_ids = wiki_token_ids(tokenizer)
    windows = calibration_windows(train_ids, args.num_samples, args.seq_len, 0)
    protocol = {
        "calibration_samples": args.num_samples,
        "eval_windows": args.eval_windows,
        "seq_len": args.seq_len,
    }
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    if stored and stored["protocol"] != protocol:
        raise SystemExit(f"{args.results} holds another protocol; pass --results NEW.json")
    record = {"protocol": protocol, "variants": stored.get("variants", {})}
    for name in args.variants:
        record["variants"][name] = result = run_variant(name, args, windows, test_ids)
        print(f"{name}: PPL {result['ppl']:.2f} at density {result['density']:.4f}", flush=True)
        args.results.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
