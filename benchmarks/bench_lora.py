"""Benchmark LoRA finetuning against a full finetune: peak memory, step time and checkpoint size, on CPU.

    python benchmarks/bench_lora.py              # GPT-2-medium shape (24 layers, 1024 wide), random weights
    python benchmarks/bench_lora.py --quick      # a tiny shape: a smoke test of this script

Both sides are ngpt's own commands, each in a process of its own (so that each peak is its own), one after
the other in one invocation:
1. `ngpt bench` of the training step on synthetic tokens, block 256, batch 1: a full finetune (AdamW over
   every weight) against `--lora_rank=8` (adapters on attn,proj,mlp; the base frozen and, when the step runs
   under bf16 autocast, held in bf16). Random weights (`--init_from=scratch`, which `ngpt bench` allows with
   LoRA): nothing is loaded, so no load inflates the peak. ms/iter and the process's peak RSS.
2. `ngpt finetune` of the same shape's weights, saved once as an ngpt checkpoint, for two steps: the size of
   the ckpt.pt each side writes (the full one: weights and two AdamW moments; LoRA's: adapters, their
   moments, and the base's reference).
Targets: LoRA's peak memory at most half the full finetune's, its checkpoint at most 2% of the full one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NGPT = [sys.executable, "-m", "nanogpt_cli"]
MEDIUM = {"n_layer": 24, "n_head": 16, "n_embd": 1024}  # GPT-2 medium, 350M parameters
QUICK = {"n_layer": 2, "n_head": 2, "n_embd": 64}
LORA = ["--lora_rank=8"]
MEMORY_TARGET, CHECKPOINT_TARGET = 0.5, 0.02


def shape_args(shape: dict, block_size: int, vocab_size: int) -> list[str]:
    return [*(f"--{key}={value}" for key, value in shape.items()), f"--block_size={block_size}",
            f"--vocab_size={vocab_size}", "--bias=True", "--dropout=0.0", "--batch_size=1",
            "--gradient_accumulation_steps=1", "--device=cpu", "--compile=False"]


def run(cmd: list[str], log: Path) -> str:
    """Run cmd, its stderr in log; return its stdout; fail loudly."""
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, NO_COLOR="1"))
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text(encoding='utf-8')[-3000:]}")
    return proc.stdout


def bench_side(name: str, common: list[str], extra: list[str], iters: int, warmup: int, work: Path) -> dict:
    out = run([*NGPT, "bench", "--init_from=scratch", *common, *extra, "--data", "synthetic", f"--iters={iters}",
               f"--warmup={warmup}", "--json", f"--out_dir={work / 'bench-out'}"], work / f"bench-{name}.log")
    result = json.loads(out.strip().splitlines()[-1])
    return {key: result[key] for key in ("ms_per_iter", "peak_memory_mb", "memory_kind", "dtype", "params_millions")}


def write_base(shape: dict, block_size: int, vocab_size: int, path: Path) -> None:
    """Random weights of the shape as an ngpt checkpoint: the base both finetunes start from."""
    import torch

    from nanogpt_cli.checkpoint import FORMAT
    from nanogpt_cli.model import GPT, GPTConfig
    from nanogpt_cli.tokenizer import GPT2_META

    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape, block_size=block_size, vocab_size=vocab_size))
    torch.save({"format": FORMAT, "model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                "meta": dict(GPT2_META)}, path)


def checkpoint_side(name: str, common: list[str], extra: list[str], base: Path, work: Path) -> int:
    out = work / f"finetune-{name}"
    run([*NGPT, "--quiet", "finetune", f"--init_from={base}", *common, *extra, "--dataset=synthetic",
         "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--always_save_checkpoint", f"--out_dir={out}"],
        work / f"finetune-{name}.log")
    return (out / "ckpt.pt").stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny shape, one timed step: a smoke test")
    ap.add_argument("--iters", type=int, default=3, help="timed training steps of each side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps of each side first")
    ap.add_argument("--dtype", default="auto", help="the steps' precision on both sides (default: ngpt's choice)")
    ap.add_argument("--workdir", help="keep logs and runs here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args()
    shape, block_size, vocab_size = (QUICK, 32, 512) if args.quick else (MEDIUM, 256, 50304)
    iters, warmup = (1, 0) if args.quick else (args.iters, args.warmup)
    common = [*shape_args(shape, block_size, vocab_size), f"--dtype={args.dtype}"]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ngpt-bench-lora-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; shape {shape}, block {block_size}, batch 1, vocab {vocab_size}", flush=True)

    results: dict = {"quick": args.quick, "shape": shape}
    for name, extra in (("full", []), ("lora", LORA)):
        results[name] = bench_side(name, common, extra, iters, warmup, work)
        r = results[name]
        print(f"  {name:<5} {r['ms_per_iter']:9.1f} ms/iter  peak {r['peak_memory_mb']:8.0f} MB ({r['memory_kind']}, "
              f"{r['dtype']})", flush=True)
    base = work / "base.pt"
    write_base(shape, block_size, vocab_size, base)
    for name, extra in (("full", []), ("lora", LORA)):
        results[name]["checkpoint_bytes"] = checkpoint_side(name, common, extra, base, work)
        print(f"  {name:<5} checkpoint {results[name]['checkpoint_bytes'] / 2**20:10.2f} MB", flush=True)
    full, lora = results["full"], results["lora"]
    memory = lora["peak_memory_mb"] / full["peak_memory_mb"]
    checkpoint = lora["checkpoint_bytes"] / full["checkpoint_bytes"]
    speed = full["ms_per_iter"] / lora["ms_per_iter"]
    met = memory <= MEMORY_TARGET and checkpoint <= CHECKPOINT_TARGET
    results.update(memory_ratio=memory, checkpoint_ratio=checkpoint, step_speedup=speed, met=met)
    print(f"LoRA/full: peak memory {memory:.2f}x (target <= {MEMORY_TARGET}), checkpoint {checkpoint:.4f}x "
          f"(target <= {CHECKPOINT_TARGET}), step {speed:.2f}x faster: {'met' if met else 'NOT met'}")
    if args.json:
        print(json.dumps(results))
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
