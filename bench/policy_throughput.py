"""Policy endpoint throughput on the embedded Gemma 3 270M (bf16), against naive transformers loops.

Scoring: one few-shot LawBench-style Chinese prompt (~600 tokens, a new case each round so the
prefix cache cannot help across rounds) with ~30 charge names as options, sent through the
openai client with `echo_logprobs_from`; against a per-option loop (full prompt forward, full
logits, no batching, no prefix reuse). Generation: 8 concurrent greedy requests through the
endpoint against a sequential `generate` loop over the same prompts.

    .venv/bin/python bench/policy_throughput.py [--quick] [--options 30 --prompt-tokens 600 ...]

Prints both side by side with the ratios and writes bench/results/policy_throughput.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM

from sialoop.policy.hf import HFBackend
from sialoop.policy.model_files import embedded_model_dir
from sialoop.policy.recorder import MemoryRecorder
from sialoop.policy.server import PolicyServer

DATA = Path("/work/shared/data/lawbench-sia")
OUT = Path(__file__).parent / "results" / "policy_throughput.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--options", type=int, default=30, help="options per scoring request")
    p.add_argument(
        "--prompt-tokens", type=int, default=600, help="approximate few-shot prompt length"
    )
    p.add_argument("--rounds", type=int, default=3, help="scoring requests (each a new case)")
    p.add_argument(
        "--naive-options", type=int, default=6, help="options the naive loop scores per round"
    )
    p.add_argument("--gen-requests", type=int, default=8, help="concurrent generation requests")
    p.add_argument("--gen-tokens", type=int, default=32, help="max_tokens per generation request")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run in well under a minute"
    )
    args = p.parse_args()
    if args.quick:
        args.options, args.prompt_tokens, args.rounds = 8, 200, 1
        args.naive_options, args.gen_requests, args.gen_tokens = 2, 4, 8
    return args


def load_cases(data: Path) -> tuple[list[dict[str, str]], list[str]]:
    with open(data / "train.csv", encoding="utf-8") as f:
        cases = list(csv.DictReader(f))
    classes = json.loads((data / "classes.json").read_text(encoding="utf-8"))
    return cases, classes


def few_shot_context(
    tok, cases: list[dict[str, str]], query: dict[str, str], target_tokens: int
) -> str:
    """Worked examples (case text truncated, then its charge) up to ~target_tokens, then the query."""
    head, tail = "根据案情判断被告人的罪名。\n\n", f"案情：{query['text'][:160]}\n罪名："
    shots = ""
    for case in cases:
        # The last example is cut shorter so the prompt lands near the target length.
        for chars in (160, 120, 80, 40):
            shot = f"案情：{case['text'][:chars]}\n罪名：{case['label']}\n\n"
            if len(tok(head + shots + shot + tail)["input_ids"]) <= target_tokens:
                shots += shot
                break
        else:
            break
    return head + shots + tail


def naive_option_logprob(model, tok, context: str, option: str) -> float:
    """One full forward of context+option with full-vocabulary logits: what a plain HF loop does."""
    ids = tok(context + option)["input_ids"]
    start = len(tok(context)["input_ids"])
    with torch.inference_mode():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[j - 1, ids[j]].item() for j in range(start, len(ids)))


def bench_scoring(args, client, model, tok, cases, classes) -> dict:
    options = classes[: args.options]
    endpoint_s = naive_s = 0.0
    naive_n, diffs, agree = 0, [], 0

    def endpoint(context: str):
        return client.completions.create(
            model="base",
            prompt=[context + o for o in options],
            echo=True,
            max_tokens=0,
            logprobs=0,
            extra_body={"echo_logprobs_from": len(context)},
        )

    # Warm-up on a case not timed (first-call kernel set-up); its prefix is never reused.
    warm = few_shot_context(tok, cases[100:], cases[-1], args.prompt_tokens)
    endpoint(warm), naive_option_logprob(model, tok, warm, options[0])
    for r in range(args.rounds):
        context = few_shot_context(tok, cases[100:], cases[r], args.prompt_tokens)
        started = time.perf_counter()
        response = endpoint(context)
        endpoint_s += time.perf_counter() - started
        sums = [
            sum(v for v in c.logprobs.token_logprobs if v is not None) for c in response.choices
        ]
        started = time.perf_counter()
        naive = [
            naive_option_logprob(model, tok, context, o) for o in options[: args.naive_options]
        ]
        naive_s += time.perf_counter() - started
        naive_n += len(naive)
        diffs += [abs(a - b) for a, b in zip(sums, naive, strict=False)]
        agree += max(range(len(naive)), key=naive.__getitem__) == max(
            range(len(naive)), key=sums.__getitem__
        )
    endpoint_rate = args.options * args.rounds / endpoint_s
    naive_rate = naive_n / naive_s
    return {
        "prompt_tokens": len(tok(context)["input_ids"]),
        "options_per_request": args.options,
        "rounds": args.rounds,
        "endpoint_options_per_s": endpoint_rate,
        "naive_options_per_s": naive_rate,
        "ratio": endpoint_rate / naive_rate,
        "max_abs_diff_option_logprob": max(diffs),
        "best_of_naive_subset_agrees": f"{agree}/{args.rounds}",
    }


def bench_generation(args, client, model, tok, cases) -> dict:
    prompts = [f"案情：{c['text'][:120]}\n法院认为，" for c in cases[: args.gen_requests]]

    def one(prompt: str) -> int:
        response = client.completions.create(
            model="base", prompt=prompt, max_tokens=args.gen_tokens, temperature=0
        )
        return response.usage.completion_tokens

    def naive(prompt: str) -> int:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=0
            )
        return out.shape[1] - ids.shape[1]

    one(prompts[0]), naive(prompts[0])  # warm-up (first-call overheads)
    endpoint_tokens = endpoint_s = naive_tokens = naive_s = 0.0
    # Rounds alternate endpoint and naive so a noisy neighbour on the CPU hits both alike.
    for _ in range(args.rounds):
        started = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            endpoint_tokens += sum(pool.map(one, prompts))
        endpoint_s += time.perf_counter() - started
        started = time.perf_counter()
        naive_tokens += sum(naive(p) for p in prompts)
        naive_s += time.perf_counter() - started
    return {
        "requests": len(prompts),
        "max_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "endpoint_tokens_per_s": endpoint_tokens / endpoint_s,
        "naive_tokens_per_s": naive_tokens / naive_s,
        "ratio": (endpoint_tokens / endpoint_s) / (naive_tokens / naive_s),
        "endpoint_tokens": int(endpoint_tokens),
        "naive_tokens": int(naive_tokens),
    }


def main() -> None:
    args = parse_args()
    model_dir = embedded_model_dir()
    cases, classes = load_cases(args.data)
    backend = HFBackend(model_dir, dtype=args.dtype, max_batch=max(8, args.gen_requests))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, args.dtype)
    ).eval()
    tok = backend.tokenizer
    with PolicyServer(backend, MemoryRecorder()) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)
        scoring = bench_scoring(args, client, model, tok, cases, classes)
        generation = bench_generation(args, client, model, tok, cases)
        generation["batcher"] = dict(server.app.state.batcher.stats)
    result = {
        "model": str(model_dir),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "quick": args.quick,
        "load_average_after": os.getloadavg(),
        "scoring": scoring,
        "generation": generation,
    }
    print(f"{'':28}{'endpoint':>12}{'naive HF':>12}{'ratio':>8}")
    print(
        f"{'options scored / s':28}{scoring['endpoint_options_per_s']:12.2f}{scoring['naive_options_per_s']:12.2f}{scoring['ratio']:8.1f}x"
    )
    print(
        f"{'generated tokens / s':28}{generation['endpoint_tokens_per_s']:12.2f}{generation['naive_tokens_per_s']:12.2f}{generation['ratio']:8.1f}x"
    )
    print(
        f"prompt {scoring['prompt_tokens']} tokens, {scoring['options_per_request']} options; max |Δ option logprob| vs naive {scoring['max_abs_diff_option_logprob']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
