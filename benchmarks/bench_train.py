"""Benchmark ngpt's training speed against a baseline that trains the way nanoGPT does, side by side.

    NGPT_TEST_SHAKESPEARE=path/to/input.txt python benchmarks/bench_train.py    # both targets, full length
    python benchmarks/bench_train.py --quick                                     # smoke test, tiny configs

The baseline is ngpt itself, run as nanoGPT runs on a CPU: float32, eager, torch's default thread count
(OMP_NUM_THREADS set to it, which ngpt obeys), glibc's malloc as it comes (NGPT_MALLOPT=0), the loss read
every step (the recipe's --log_interval=1 does that for all). "ngpt" is the same command with ngpt's automatic
choices (dtype, compile, the attention kernel), which it prints with their reasons (see the logs in the work
folder); "ngpt+threads" adds NGPT_THREADS=auto, the thread count adapted to a busy machine (off by default: it
costs bit-exact reruns).

1. recipe: the core issue's CPU recipe, `ngpt train --preset shakespeare-char --device=cpu --compile=False
   --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
   --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0` on Tiny Shakespeare (from $NGPT_TEST_SHAKESPEARE
   or --corpus): whole-run wall time (start-up and evaluations included) and the best val loss.
   Target: ngpt reaches a best val loss <= 1.90 in at most half the baseline's wall time.
2. gpt2: a GPT-2 124M-shaped model (block 256, batch 4, no accumulation) on synthetic tokens, `ngpt bench`
   tokens/s. Target: ngpt >= 2.5x the baseline.

Both sides of each target run one after the other in one invocation (--repeat alternates them more
times); on a shared machine timings are noisy, so compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NGPT = [sys.executable, "-m", "nanogpt_cli"]

RECIPE = ["--preset", "shakespeare-char", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
          "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
          "--lr_decay_iters=2000", "--dropout=0.0"]
RECIPE_QUICK = ["--preset", "shakespeare-char", "--device=cpu", "--compile=False", "--eval_iters=2",
                "--log_interval=1", "--block_size=32", "--batch_size=4", "--n_layer=1", "--n_head=2", "--n_embd=32",
                "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5", "--dropout=0.0"]
GPT2 = ["--preset", "gpt2-124m", "--device=cpu", "--block_size=256", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--data", "synthetic"]
GPT2_QUICK = ["--preset", "gpt2-124m", "--device=cpu", "--block_size=32", "--batch_size=2",
              "--gradient_accumulation_steps=1", "--n_layer=1", "--n_head=2", "--n_embd=64", "--vocab_size=512",
              "--max_iters=10", "--data", "synthetic"]
BASELINE = ["--dtype=float32", "--compile=False"]
VAL_TARGET, WALL_TARGET, TOKENS_TARGET = 1.90, 2.0, 2.5


def default_threads() -> int:
    """torch's default intra-op thread count here (one per physical core), what nanoGPT runs with."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                              if k != "OMP_NUM_THREADS"}, check=True)
    return int(out.stdout.strip())


SIDES = ("baseline", "ngpt", "ngpt+threads")


def env_for(side: str, threads: int, work: Path) -> dict:
    env = dict(os.environ, NGPT_DATA_DIR=str(work / "data"), NO_COLOR="1",
               NGPT_VERBOSE="1")  # the device line with the reasons for ngpt's choices
    env.pop("OMP_NUM_THREADS", None)
    env.pop("NGPT_THREADS", None)
    if side == "baseline":
        env["OMP_NUM_THREADS"] = str(threads)
        env["NGPT_MALLOPT"] = "0"  # glibc's malloc as it comes, as under nanoGPT
    elif side == "ngpt+threads":
        env["NGPT_THREADS"] = "auto"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{side}")  # a cold compile cache, should one compile
    return env


def run(cmd: list[str], env: dict, log: Path) -> float:
    """Run cmd with its output in log; return its wall time; fail loudly."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text(encoding='utf-8')[-3000:]}")
    return seconds


def choices(log: Path) -> str:
    """The device line ngpt printed: its dtype, compile and thread choices with their reasons."""
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.startswith("device "):
            return line.strip()
    return ""


def prepare_data(work: Path, corpus: Path | None, quick: bool) -> None:
    if corpus is None:  # --quick without a corpus: some text with Shakespeare's shape
        rng = random.Random(0)
        words = ["the", "king", "my", "lord", "thou", "art", "love", "night", "what", "shall", "we", "do"]
        lines = [f"{rng.choice(['ROMEO', 'JULIET', 'KING'])}:\n" + " ".join(rng.choices(words, k=12)) + ".\n"
                 for _ in range(600 if quick else 20000)]
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join(lines), encoding="utf-8")
    run([*NGPT, "prepare", "shakespeare-char", "--source", str(corpus), "--data-dir", str(work / "data"), "--quiet"],
        dict(os.environ), work / "prepare.log")


def recipe_run(side: str, args: list[str], threads: int, work: Path, rep: int) -> dict:
    out = work / f"recipe-{side}-{rep}"
    log = work / f"recipe-{side}-{rep}.log"
    extra = BASELINE if side == "baseline" else []
    start = time.time()
    wall = run([*NGPT, "train", *args, *extra, f"--out_dir={out}"], env_for(side, threads, work), log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    evals = [r for r in records if "val_loss" in r]
    steps = [r["ms"] for r in records if r.get("ms") is not None]
    reached = next((r for r in evals if r["val_loss"] <= VAL_TARGET), None)
    return {"side": side, "wall_s": wall, "best_val_loss": min(r["val_loss"] for r in evals),
            "to_target_s": reached["time"] - start if reached else None,
            "median_ms_per_iter": statistics.median(steps) if steps else None, "choices": choices(log)}


def gpt2_run(side: str, args: list[str], threads: int, work: Path, rep: int, iters: int, warmup: int) -> dict:
    log = work / f"gpt2-{side}-{rep}.log"
    extra = BASELINE if side == "baseline" else []
    cmd = [*NGPT, "bench", *args, *extra, f"--iters={iters}", f"--warmup={warmup}", "--json",
           f"--out_dir={work / 'gpt2-out'}"]
    env = env_for(side, threads, work)
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text(encoding='utf-8')[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"side": side, "tokens_per_second": result["tokens_per_second"], "ms_per_iter": result["ms_per_iter"],
            "warmup_s": result["warmup_seconds"], "dtype": result["dtype"], "compile": result["compile"],
            "threads": result["threads"], "mfu": result["mfu"], "peak_memory_mb": result["peak_memory_mb"],
            "choices": choices(log)}


def load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configs, a few iterations: a smoke test")
    ap.add_argument("--only", choices=("recipe", "gpt2"), help="run one target only")
    ap.add_argument("--corpus", help="Tiny Shakespeare's input.txt (default: $NGPT_TEST_SHAKESPEARE)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate baseline and ngpt this many times each")
    ap.add_argument("--gpt2-iters", type=int, default=4, help="timed iterations of the GPT-2 bench")
    ap.add_argument("--gpt2-warmup", type=int, default=2, help="untimed iterations of the GPT-2 bench")
    ap.add_argument("--workdir", help="keep data, logs and runs here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--no-adaptive-threads", action="store_true", help="leave out the NGPT_THREADS=auto runs")
    args = ap.parse_args()
    sides = SIDES[:2] if args.no_adaptive_threads else SIDES

    corpus = args.corpus or os.environ.get("NGPT_TEST_SHAKESPEARE")
    if not args.quick and args.only != "gpt2" and not (corpus and Path(corpus).is_file()):
        sys.exit("the recipe needs Tiny Shakespeare: set NGPT_TEST_SHAKESPEARE or pass --corpus (or --only gpt2)")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ngpt-bench-train-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    threads = default_threads()
    print(f"work folder {work}; baseline threads {threads} (torch's default); {load()}", flush=True)
    results: dict = {"quick": args.quick, "threads_default": threads}
    ok = True

    if args.only != "gpt2":
        prepare_data(work, Path(corpus) if corpus and not args.quick else None, args.quick)
        recipe = RECIPE_QUICK if args.quick else RECIPE
        print("\n1. recipe: ngpt train " + " ".join(recipe), flush=True)
        runs = []
        for rep in range(args.repeat):
            for side in sides:
                r = recipe_run(side, recipe, threads, work, rep)
                runs.append(r)
                to = f"{r['to_target_s']:.1f} s" if r["to_target_s"] is not None else "never"
                print(f"  {side:<12} wall {r['wall_s']:7.1f} s  best val loss {r['best_val_loss']:.4f}  "
                      f"val <= {VAL_TARGET} after {to}  median {r['median_ms_per_iter']:.1f} ms/iter  ({load()})",
                      flush=True)
        base = statistics.median(r["wall_s"] for r in runs if r["side"] == "baseline")
        results["recipe"] = {"runs": runs}
        for side in sides[1:]:
            ours = [r for r in runs if r["side"] == side]
            ratio = base / statistics.median(r["wall_s"] for r in ours)
            best = max(r["best_val_loss"] for r in ours)
            met = ratio >= WALL_TARGET and best <= VAL_TARGET
            if side == "ngpt":
                ok &= met or args.quick
                results["recipe"].update(wall_ratio=ratio, ngpt_best_val_loss=best, met=met)
            results["recipe"][f"{side}_wall_ratio"] = ratio
            print(f"  wall-time ratio baseline/{side} {ratio:.2f}x (target >= {WALL_TARGET}x), best val loss "
                  f"{best:.4f} (target <= {VAL_TARGET}): {'met' if met else 'NOT met'}")
            print(f"    {side} chose: {ours[-1]['choices']}")

    if args.only != "recipe":
        gpt2 = GPT2_QUICK if args.quick else GPT2
        iters, warmup = (2, 1) if args.quick else (args.gpt2_iters, args.gpt2_warmup)
        print("\n2. gpt2: ngpt bench " + " ".join(gpt2) + f" --iters={iters} --warmup={warmup}", flush=True)
        runs = []
        for rep in range(args.repeat):
            for side in sides:
                r = gpt2_run(side, gpt2, threads, work, rep, iters, warmup)
                runs.append(r)
                print(f"  {side:<12} {r['tokens_per_second']:9,.0f} tokens/s  {r['ms_per_iter']:9.1f} ms/iter  "
                      f"{r['dtype']}, compile {r['compile']}, {r['threads']} threads, warm-up {r['warmup_s']:.1f} s "
                      f"({load()})", flush=True)
        base = statistics.median(r["tokens_per_second"] for r in runs if r["side"] == "baseline")
        results["gpt2"] = {"runs": runs}
        for side in sides[1:]:
            ours = [r for r in runs if r["side"] == side]
            ratio = statistics.median(r["tokens_per_second"] for r in ours) / base
            met = ratio >= TOKENS_TARGET
            if side == "ngpt":
                ok &= met or args.quick
                results["gpt2"].update(tokens_ratio=ratio, met=met)
            results["gpt2"][f"{side}_tokens_ratio"] = ratio
            print(f"  tokens/s ratio {side}/baseline {ratio:.2f}x (target >= {TOKENS_TARGET}x): "
                  f"{'met' if met else 'NOT met'}")
            print(f"    {side} chose: {ours[-1]['choices']}")

    if args.json:
        print(json.dumps(results))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
