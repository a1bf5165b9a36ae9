"""Benchmark whole `ngpt sample` processes against nanoGPT's way of sampling: GPT-2 124M shape, CPU.

    python benchmarks/bench_decode.py                     # 256 new tokens
    python benchmarks/bench_decode.py --new-tokens 64 --json
    python benchmarks/bench_decode.py --val-loss out/shakespeare-char-cpu     # each precision's val loss
    python benchmarks/bench_decode.py --first-token                           # start-up to the first token

A checkpoint of random weights (n_layer 12, n_head 12, n_embd 768, vocab 50304, block 1024) is saved in a
temporary folder and read once, so that every process starts with a warm page cache. Each row is one process,
timed from its start to its exit, generating the same number of tokens from the same prompt with ngpt's
default sampling (temperature 0.8, top-k 200, no stop at <|endoftext|>):
  baseline  nanoGPT's sample.py: a plain torch.load (the file read into memory), the model built with its random
            initialisation and then loaded, and the whole context recomputed for every token (`use_cache=False`);
  fp32      `ngpt sample` (mapped checkpoint, KV cache), float32;
  bf16      `ngpt sample --dtype=bfloat16` (bf16 weights);
  int8      `ngpt sample --quantize=int8` (weight-only int8, float32 between the matrices);
  int8+bf16 `ngpt sample --quantize=int8 --dtype=bfloat16` (the int8 kernel's bf16 activations throughout).
The ratio is the baseline's wall time over the row's. The load average is printed with the figures: on a shared
machine they move with it. ngpt's bytecode is written first (`compile_bytecode`), as an install has it.

--first-token times instead each row's start-up: one process per row and repeat (--repeats, alternating rows),
each generating one token, timed from its start to the first byte of that token on its stdout (the byte after the
echoed prompt; ngpt flushes each piece as it comes), and to its exit; medians, with the ratio to the baseline's.

--val-loss RUN (repeatable) measures instead what each precision does to a trained model: the run's checkpoint is
loaded as `ngpt sample` loads it in each precision (`for_inference`) and evaluated as `ngpt eval` evaluates it
(`evaluate_loss` on its own dataset's val split: --eval-iters batches of its block size, seed 1337, the same
batches for every row); the table
gives each val loss and its difference from float32 (the issue's target for int8: within 0.02). A batch's rows go
through torch's int8 kernel (bf16 activations), as `ngpt eval` computes them; "int8 native" sends them all through
ngpt's native kernel (float32 activations), as decoding computes its few rows, where that kernel could be built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The meaning of life is"
SAMPLING = ["--temperature=0.8", "--top_k=200", "--seed=1337", "--num_samples=1", "--stop_at_eot=False"]
VARIANTS = {"fp32": [], "bf16": ["--dtype=bfloat16"], "int8": ["--quantize=int8"],
            "int8+bf16": ["--quantize=int8", "--dtype=bfloat16"]}
PRECISIONS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8"),
              "int8+bf16": ("bfloat16", "int8")}  # name: (dtype, quantize)


def nanogpt_sample(checkpoint: str, new_tokens: int) -> None:
    """nanoGPT's sample.py for one sample: torch.load, build, load, generate recomputing the context."""
    import tiktoken
    import torch

    from nanogpt_cli.model import GPT, GPTConfig

    ckpt = torch.load(checkpoint, map_location="cpu")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode(PROMPT)])
    generator = torch.Generator().manual_seed(1337)
    with torch.inference_mode():
        tokens = [int(t) for t in model.generate(idx, new_tokens, temperature=0.8, top_k=200, generator=generator,
                                                 use_cache=False)]
    print(PROMPT + enc.decode([t for t in tokens if t < enc.n_vocab]))


def save_random_checkpoint(folder: Path) -> Path:
    import torch

    from nanogpt_cli.model import GPT, GPTConfig
    from nanogpt_cli.tokenizer import GPT2_META

    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=True)
    path = folder / "ckpt.pt"
    torch.save({"model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config), "meta": dict(GPT2_META),
                "format": "ngpt/1", "iter_num": 0}, path)
    return path


def val_losses(run: str, eval_iters: int, batch_size: int) -> dict[str, float]:
    """The val loss of run's checkpoint in each precision of PRECISIONS, on the same batches of its dataset."""
    import torch

    from nanogpt_cli import native, precision
    from nanogpt_cli.checkpoint import load_model
    from nanogpt_cli.data import BatchLoader, dataset_path, load_meta
    from nanogpt_cli.evaluate import evaluate_loss
    from nanogpt_cli.precision import for_inference

    cpu = torch.device("cpu")
    model, meta, ckpt = load_model("resume", run)
    trained_on = (ckpt or {}).get("config") or {}
    if not trained_on.get("dataset"):
        raise SystemExit(f"{run}: its checkpoint names no dataset to evaluate on")
    folder = dataset_path(trained_on["dataset"], trained_on.get("data_dir"))
    loader = BatchLoader(folder, load_meta(folder), batch_size, model.config.block_size, cpu, 1337)
    losses = {}
    rows = {name: precision.NATIVE_MAX_ROWS for name in PRECISIONS}
    if native.int8_kernel() is not None:  # int8 as decoding computes it: every row through the native kernel
        rows["int8 native"] = batch_size * model.config.block_size
    for name, max_rows in rows.items():
        dtype, quantize = PRECISIONS[name.split()[0]]
        model = for_inference(load_model("resume", run)[0], cpu, dtype, quantize)
        default, precision.NATIVE_MAX_ROWS = precision.NATIVE_MAX_ROWS, max_rows
        try:
            with torch.inference_mode():
                losses[name] = evaluate_loss(model, loader, eval_iters, cpu, dtype, seed=1337,
                                             splits=("val",))["val"]
        finally:
            precision.NATIVE_MAX_ROWS = default
    return losses


def report_val_losses(runs: list[str], eval_iters: int, batch_size: int, as_json: bool) -> int:
    results = {run: val_losses(run, eval_iters, batch_size) for run in runs}
    if as_json:
        print(json.dumps({"eval_iters": eval_iters, "batch_size": batch_size, "val_loss": results}))
        return 0
    names = list(next(iter(results.values())))
    print(f"| run | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for run, losses in results.items():
        cells = [f"{losses['fp32']:.4f}"] + [f"{losses[name]:.4f} ({losses[name] - losses['fp32']:+.4f})"
                                             for name in names[1:]]
        print(f"| {run} | {' | '.join(cells)} |")
    print(f"val loss on {eval_iters} batches of {batch_size} (seed 1337); in brackets, the change from fp32; "
          f"int8 as eval computes a batch (torch's kernel), int8 native as decoding does (ngpt's kernel)")
    return 0


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def first_token(command: list[str]) -> tuple[float, float]:
    """(seconds to the first byte after the echoed prompt on the command's stdout, seconds to its exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wanted, seen = len(PROMPT.encode()) + 1, b""
    while len(seen) < wanted:
        piece = proc.stdout.read1(wanted - len(seen))
        if not piece:
            break
        seen += piece
    first = time.perf_counter() - start
    proc.stdout.read()
    stderr = proc.stderr.read().decode(errors="replace")
    proc.wait()
    if proc.returncode != 0 or len(seen) < wanted:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return first, time.perf_counter() - start


def report_first_tokens(commands: dict[str, list[str]], repeats: int, as_json: bool) -> int:
    import statistics

    load_before = os.getloadavg()
    runs = {name: [] for name in commands}
    for _ in range(repeats):  # alternating, so that every row sees the machine's drift alike
        for name, command in commands.items():
            runs[name].append(first_token(command))
    first = {name: statistics.median(t[0] for t in times) for name, times in runs.items()}
    end = {name: statistics.median(t[1] for t in times) for name, times in runs.items()}
    report = {"repeats": repeats, "cpus": os.cpu_count(),
              "first_token_seconds": {name: round(v, 3) for name, v in first.items()},
              "first_token_range": {name: [round(min(t[0] for t in times), 3), round(max(t[0] for t in times), 3)]
                                    for name, times in runs.items()},
              "process_seconds": {name: round(v, 3) for name, v in end.items()},
              "speedup": {name: round(first["baseline"] / v, 2) for name, v in first.items()},
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    if as_json:
        print(json.dumps(report))
        return 0
    for name in commands:
        low, high = report["first_token_range"][name]
        print(f"{name:>9}: first token {first[name]:5.2f} s ({low:.2f}-{high:.2f}), process {end[name]:5.2f} s, "
              f"{report['speedup'][name]:5.2f}x the baseline's first token")
    print(f"medians of {repeats}; load average {load_before[0]:.1f} before, {report['load_average_after'][0]:.1f} "
          f"after ({report['cpus']} CPUs)")
    return 0


def compile_bytecode() -> None:
    """Write the bytecode of ngpt's modules, as an installed package has it. Where PYTHONDONTWRITEBYTECODE is set
    (this project's CI machines set it) every process would otherwise compile them from their source again:
    about 0.15 s of each ngpt process on a 2-core Xeon (int8, 256 tokens: 3.43-3.71 s against 3.65-3.73 s)."""
    import compileall

    import nanogpt_cli

    compileall.compile_dir(Path(nanogpt_cli.__file__).parent, quiet=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--val-loss", metavar="RUN", action="append",
                        help="a trained run (out_dir): each precision's val loss instead of the timing (repeatable)")
    parser.add_argument("--first-token", action="store_true", help="time each row's start-up to its first token")
    parser.add_argument("--repeats", type=int, default=5, help="--first-token: processes per row")
    parser.add_argument("--eval-iters", type=int, default=200, help="--val-loss: batches evaluated")
    parser.add_argument("--batch-size", type=int, default=12, help="--val-loss: rows per batch")
    parser.add_argument("--nanogpt-baseline", metavar="CKPT", help=argparse.SUPPRESS)  # the baseline's process
    args = parser.parse_args(argv)
    if args.nanogpt_baseline:
        nanogpt_sample(args.nanogpt_baseline, args.new_tokens)
        return 0
    if args.val_loss:
        return report_val_losses(args.val_loss, args.eval_iters, args.batch_size, args.json)
    compile_bytecode()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_random_checkpoint(Path(folder))
        checkpoint.read_bytes()  # a warm page cache for every process
        load_before = os.getloadavg()
        new_tokens = 1 if args.first_token else args.new_tokens
        baseline = [sys.executable, __file__, "--nanogpt-baseline", str(checkpoint), "--new-tokens", str(new_tokens)]
        sample = [sys.executable, "-m", "nanogpt_cli", "--quiet", "sample", f"--out_dir={folder}", "--device=cpu",
                  f"--max_new_tokens={new_tokens}", f"--prompt={PROMPT}", *SAMPLING]
        if args.first_token:
            return report_first_tokens({"baseline": baseline, **{name: [*sample, *extra] for name, extra in
                                                                  VARIANTS.items()}}, args.repeats, args.json)
        rows = {"baseline": timed(baseline)}
        for name, extra in VARIANTS.items():
            rows[name] = timed([*sample, *extra])
        load_after = os.getloadavg()
    report = {"model": "gpt2-124M shape, random weights", "new_tokens": args.new_tokens, "cpus": os.cpu_count(),
              "seconds": {name: round(seconds, 2) for name, seconds in rows.items()},
              "speedup": {name: round(rows["baseline"] / seconds, 2) for name, seconds in rows.items()},
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after]}
    if args.json:
        print(json.dumps(report))
        return 0
    for name, seconds in rows.items():
        print(f"{name:>9}: {seconds:7.2f} s for the whole process, {report['speedup'][name]:5.2f}x the baseline")
    print(f"{args.new_tokens} new tokens; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({report['cpus']} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
