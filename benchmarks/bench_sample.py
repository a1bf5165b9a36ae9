"""Benchmark `ngpt sample`'s decoding: KV cache against full recomputation, GPT-2-124M shape, CPU.

    python benchmarks/bench_sample.py                       # 256 new tokens from a 16-token prompt
    python benchmarks/bench_sample.py --new-tokens 64 --json

Random weights (n_layer 12, n_head 12, n_embd 768, vocab 50304, block 1024), one sequence,
float32, torch.inference_mode. Both paths run in the same process through `GPT.generate`
with the same seed and ngpt's default sampling (temperature 0.8, top-k 200): `use_cache=True`
prefills the prompt once and then feeds one token per step; `use_cache=False` recomputes the
whole context every step, as nanoGPT's sample.py does. Each path gets a short untimed warm-up.
The machine's load average is printed too: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from nanogpt_cli.model import GPT, GPTConfig


def timed_generate(model: GPT, idx: torch.Tensor, new_tokens: int, use_cache: bool, seed: int) -> tuple[float, list]:
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    tokens = [t.item() for t in model.generate(idx, new_tokens, temperature=0.8, top_k=200,
                                               generator=generator, use_cache=use_cache)]
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed tokens per path first")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True)
    model = GPT(config).eval()
    idx = torch.randint(config.vocab_size, (1, args.prompt_tokens))
    load_before = os.getloadavg()

    results = {}
    for use_cache in (True, False):
        timed_generate(model, idx, args.warmup, use_cache, args.seed)
        seconds, tokens = timed_generate(model, idx, args.new_tokens, use_cache, args.seed)
        results["cache" if use_cache else "no_cache"] = {"seconds": round(seconds, 3),
                                                         "tokens_per_second": round(args.new_tokens / seconds, 2),
                                                         "tokens": tokens}
        if not args.json:
            print(f"{'KV cache' if use_cache else 'full recompute':>15}: {args.new_tokens} tokens in "
                  f"{seconds:6.2f} s = {args.new_tokens / seconds:7.2f} tokens/s", file=sys.stderr, flush=True)
    cache, full = results["cache"], results["no_cache"]
    speedup = cache["tokens_per_second"] / full["tokens_per_second"]
    same = cache.pop("tokens") == full.pop("tokens")
    report = {"model": "gpt2-124M shape, random weights", "params_millions": round(model.get_num_params() / 1e6, 1),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cache": cache, "no_cache": full, "speedup": round(speedup, 2),
              "same_tokens": same, "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"KV cache {cache['tokens_per_second']:.2f} tokens/s, full recompute {full['tokens_per_second']:.2f} "
              f"tokens/s: {speedup:.1f}x faster with the cache (same tokens: {same}; {report['threads']} threads; "
              f"load average {load_before[0]:.1f} before, {report['load_average_after'][0]:.1f} after)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
