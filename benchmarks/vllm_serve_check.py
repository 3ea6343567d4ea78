"""GPU check of the PIFA vLLM plugin: vLLM vs transformers outputs, and tokens/s vs dense.

**THIS SCRIPT HAS NOT BEEN RUN.** It was written with the plugin (issue #8) on
a machine without a GPU and without a vLLM install next to pifa-modifier
(vLLM 0.33 pins torch 2.14 / compressed-tensors 0.17, pifa-modifier torch 2.13 /
compressed-tensors 0.19; see docs/vllm.md "Installing"). Expect to fix details
on the first run.

Because the two stacks cannot share one environment, the work is split in
steps, each run by the interpreter of the matching environment:

1. ``reference`` (pifa-modifier env): load the PIFA checkpoint with
   transformers (``import pifa_modifier`` installs the loader), greedy-decode
   a few prompts, then score prompt + continuation teacher-forced and keep
   each position's log-probability of the actual next token::

       python benchmarks/vllm_serve_check.py reference --model PIFA_DIR --out ref.json

2. ``vllm`` (vLLM env with pifa-modifier installed, so the ``pifa`` plugin
   loads): greedy-decode the same prompts, score the same token sequences
   with ``prompt_logprobs``, compare with ``ref.json``; then measure
   generation throughput (tokens/s) of the PIFA checkpoint::

       python benchmarks/vllm_serve_check.py vllm --model PIFA_DIR --ref ref.json --out pifa.json

3. The same ``vllm`` step on the dense model (``pifa export-dense PIFA_DIR
   DENSE_DIR``, or the base SmolLM2) without ``--ref`` for the dense tokens/s::

       python benchmarks/vllm_serve_check.py vllm --model DENSE_DIR --out dense.json

4. ``compare``: print the agreement and the PIFA/dense throughput ratio::

       python benchmarks/vllm_serve_check.py compare pifa.json dense.json

Pass criteria printed by ``vllm``: greedy tokens identical for every prompt up
to the first position where transformers' top-2 log-probabilities are within
``--tie-margin`` (bf16 near-ties may legitimately flip), and the maximum
|logprob difference| on teacher-forced tokens below ``--logprob-tol``
(default 0.1 nats for bf16: the two stacks use different GEMM kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Pivoting factorization compresses a weight matrix by",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
    "In 1969, the Apollo 11 mission",
    "A list of prime numbers: 2, 3, 5, 7,",
    "Translate to French: 'Good morning, how are you?' ->",
]


# --------------------------------------------------------------- reference
def run_reference(args: argparse.Namespace) -> None:
    """transformers (pifa-modifier env): greedy tokens and teacher-forced logprobs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pifa_modifier  # noqa: F401  (installs the PIFA checkpoint loader)

    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    records = []
    for prompt in PROMPTS[: args.prompts]:
        ids = tok(prompt, return_tensors="pt").input_ids.to(args.device)
        with torch.no_grad():
            gen = model.generate(
                ids, max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1
            )
            full = gen[0]
            logits = model(full[None]).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        # position p predicts token p + 1
        target = full[1:]
        token_logp = logp[:-1].gather(-1, target[:, None])[:, 0]
        top2 = logp[:-1].topk(2, dim=-1).values
        records.append(
            {
                "prompt": prompt,
                "prompt_ids": ids[0].tolist(),
                "greedy_ids": full[ids.shape[1] :].tolist(),
                "token_logprobs": token_logp.tolist(),
                "top2_margin": (top2[:, 0] - top2[:, 1]).tolist(),
            }
        )
    Path(args.out).write_text(json.dumps({"model": args.model, "records": records}, indent=1))
    print(f"wrote {args.out}: {len(records)} prompts")


# --------------------------------------------------------------------- vLLM
def run_vllm(args: argparse.Namespace) -> None:
    """vLLM (its own env): agreement with the reference, then generation tokens/s."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        tensor_parallel_size=1,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        seed=0,
    )
    result: dict[str, Any] = {"model": args.model, "enforce_eager": args.enforce_eager}
    config = llm.llm_engine.model_config
    result["quantization"] = getattr(config, "quantization", None)
    print("vLLM quantization method:", result["quantization"])
    if args.ref:
        result["agreement"] = _agreement(
            llm, SamplingParams, json.loads(Path(args.ref).read_text()), args
        )
    result["throughput"] = _throughput(llm, SamplingParams, args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "agreement"}, indent=1))


def _agreement(llm: Any, sampling_params: Any, ref: dict, args: argparse.Namespace) -> dict:
    records = ref["records"]
    greedy = sampling_params(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=False)
    outs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in records], greedy)
    # teacher-forced: score exactly the transformers sequence (prompt + its continuation)
    score = sampling_params(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    seqs = [r["prompt_ids"] + r["greedy_ids"] for r in records]
    scored = llm.generate([{"prompt_token_ids": s} for s in seqs], score)
    per_prompt, worst, all_ok = [], 0.0, True
    for rec, out, sc, seq in zip(records, outs, scored, seqs, strict=True):
        got = list(out.outputs[0].token_ids)
        want = rec["greedy_ids"]
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None
        )
        if first_diff is None and len(got) != len(want):
            first_diff = min(len(got), len(want))  # one stopped at EOS earlier
        # vLLM prompt_logprobs[p] is the distribution that produced token p (None at p = 0)
        diffs = []
        for p in range(1, len(seq)):
            entry = sc.prompt_logprobs[p]
            vllm_lp = entry[seq[p]].logprob
            diffs.append(abs(vllm_lp - rec["token_logprobs"][p - 1]))
        max_diff = max(diffs) if diffs else 0.0
        worst = max(worst, max_diff)
        tie = False
        if first_diff is not None:
            pos = len(rec["prompt_ids"]) - 1 + first_diff
            tie = rec["top2_margin"][pos] < args.tie_margin
        ok = (first_diff is None or tie) and max_diff < args.logprob_tol
        all_ok &= ok
        per_prompt.append(
            {
                "prompt": rec["prompt"],
                "greedy_match": first_diff is None,
                "first_divergence": first_diff,
                "divergence_at_near_tie": tie,
                "max_abs_logprob_diff": max_diff,
                "ok": ok,
            }
        )
        print(f"{'OK  ' if ok else 'FAIL'} {rec['prompt'][:40]!r}: first divergence "
              f"{first_diff}, max |dlogp| {max_diff:.4f}")  # fmt: skip
    return {"all_ok": all_ok, "max_abs_logprob_diff": worst, "prompts": per_prompt}


def _throughput(llm: Any, sampling_params: Any, args: argparse.Namespace) -> dict:
    import random

    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(args.input_len)]}
        for _ in range(args.batch)
    ]
    params = sampling_params(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: min(8, args.batch)], params, use_tqdm=False)  # warm-up / graphs
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    best = min(times)
    return {
        "batch": args.batch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "generated_tokens": generated,
        "seconds": times,
        "tokens_per_s": generated / best,
    }


# ----------------------------------------------------------------- compare
def run_compare(args: argparse.Namespace) -> None:
    pifa, dense = (json.loads(Path(p).read_text()) for p in (args.pifa, args.dense))
    agreement = pifa.get("agreement")
    if agreement:
        print(f"agreement with transformers: all_ok={agreement['all_ok']}, "
              f"max |dlogp| = {agreement['max_abs_logprob_diff']:.4f}")  # fmt: skip
    tp, td = pifa["throughput"]["tokens_per_s"], dense["throughput"]["tokens_per_s"]
    shape = pifa["throughput"]
    print(f"PIFA {tp:.1f} tok/s, dense {td:.1f} tok/s, ratio {tp / td:.3f} "
          f"(batch {shape['batch']}, out {shape['output_len']})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    ref = sub.add_parser("reference", help="transformers reference (pifa-modifier env)")
    ref.add_argument("--model", required=True)
    ref.add_argument("--out", required=True)
    ref.add_argument("--device", default="cuda")
    for p in (ref, vl := sub.add_parser("vllm", help="vLLM run (vLLM env)")):
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--prompts", type=int, default=len(PROMPTS))
        p.add_argument("--max-new-tokens", type=int, default=32)
    vl.add_argument("--model", required=True)
    vl.add_argument("--out", required=True)
    vl.add_argument("--ref", help="reference JSON: also check agreement")
    vl.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    vl.add_argument("--max-model-len", type=int, default=2048)
    vl.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    vl.add_argument("--logprob-tol", type=float, default=0.1)
    vl.add_argument("--tie-margin", type=float, default=0.05)
    vl.add_argument("--batch", type=int, default=64)
    vl.add_argument("--input-len", type=int, default=128)
    vl.add_argument("--output-len", type=int, default=128)
    vl.add_argument("--repeats", type=int, default=3)
    cmp = sub.add_parser("compare", help="print agreement and PIFA/dense tokens/s")
    cmp.add_argument("pifa")
    cmp.add_argument("dense")
    args = parser.parse_args(argv)
    {"reference": run_reference, "vllm": run_vllm, "compare": run_compare}[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
