"""Benchmark `ngpt serve`'s batched decoding: one client against 8 concurrent clients, in one run.

    python benchmarks/bench_serve.py                         # GPT-2 124M shape, 64 new tokens per request
    python benchmarks/bench_serve.py --n-layer 4 --n-embd 256 --json

A real uvicorn server on a free loopback port, in this process, over a model of random weights with
GPT-2's tokenizer (n_layer 12, n_head 12, n_embd 768, vocab 50304, block 1024 by default), float32.
The official openai client sends completions (temperature 0.8, top-k 200, a seed each, an 18-token
prompt): first one client, request after request, then `--clients` clients at once, each sending the
same number of requests. Aggregate tokens/s is the completion tokens of a phase (the `usage` the server
reports) over its wall time; the ratio is the concurrent figure over the single client's. Concurrent
requests share one decoding forward per step, so the weights are read once for all of them; on a
CPU one step of 8 rows costs little more than a step of one. The machine's load average is printed
too: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch

from nanogpt_cli.config import ServeConfig, build
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.precision import for_inference
from nanogpt_cli.serve import build_service, create_app, uvicorn_server
from nanogpt_cli.tokenizer import TiktokenTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to"  # 18 GPT-2 tokens


def run_phase(api: openai.OpenAI, clients: int, requests_per_client: int, new_tokens: int) -> dict:
    """`clients` clients at once, each sending requests_per_client completions one after another."""

    def client(index: int) -> int:
        tokens = 0
        for number in range(requests_per_client):
            response = api.completions.create(model="bench", prompt=PROMPT, max_tokens=new_tokens, temperature=0.8,
                                              seed=1000 * index + number, extra_body={"top_k": 200})
            tokens += response.usage.completion_tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests_per_client, "completion_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--new-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the second phase")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each phase")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, dropout=0.0, bias=True)
    cfg = build(ServeConfig, None, ["--port=0", "--model_name=bench", f"--max_batch={args.clients}",
                                    f"--max_queue={args.clients}", f"--max_tokens={args.new_tokens}"])
    # the weights laid out as `ngpt serve` lays them out for max_batch rows (sample.load_for_sampling)
    model = for_inference(GPT(config), torch.device(args.device), "float32", "none", rows=cfg.max_batch)
    tokenizer = TiktokenTokenizer("gpt2")
    service = build_service(cfg, model, tokenizer, torch.device(args.device), "float32")
    ports: queue.Queue = queue.Queue()
    server = uvicorn_server(create_app(service), "127.0.0.1", 0, ports.put)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{ports.get(timeout=60)}/v1", api_key="none", max_retries=0,
                        timeout=3600)
    load_before = os.getloadavg()
    try:
        run_phase(api, 1, 1, 4)  # warm-up: the first forward allocates the cache, the allocator settles
        phases = []
        for clients in (1, args.clients):
            phases.append(run_phase(api, clients, args.requests, args.new_tokens))
            if not args.json:
                p = phases[-1]
                print(f"{clients:>2} client{'s' if clients > 1 else ' '}: {p['completion_tokens']} tokens in "
                      f"{p['seconds']:6.2f} s = {p['tokens_per_second']:7.2f} tokens/s", file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        thread.join(60)
    one, many = phases
    ratio = many["tokens_per_second"] / one["tokens_per_second"]
    report = {"model": f"GPT-2 shape (n_layer {args.n_layer}, n_head {args.n_head}, n_embd {args.n_embd}), random "
                       "weights, float32", "params_millions": round(model.get_num_params() / 1e6, 1),
              "device": args.device, "prompt_tokens": len(tokenizer.encode(PROMPT)), "new_tokens": args.new_tokens,
              "one_client": one, "concurrent": many, "ratio": round(ratio, 2),
              "environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                              "load_average": {"before": load_before, "after": os.getloadavg()}}}
    if args.json:
        print(json.dumps(report))
        return 0
    environment = report["environment"]
    print(f"{args.clients} concurrent clients: {many['tokens_per_second']:.2f} tokens/s in all = {ratio:.2f}x one "
          f"client's {one['tokens_per_second']:.2f} ({report['params_millions']}M parameters on {args.device}, "
          f"{environment['threads']} threads, load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
