"""The modern recipe against nanoGPT's CPU recipe, side by side: wall time of the whole run and 200-batch val loss.

    NGPT_TEST_SHAKESPEARE=path/to/input.txt python benchmarks/bench_recipe.py
    NGPT_TEST_SHAKESPEARE=path/to/input.txt python benchmarks/bench_recipe.py --ablation   # the README's table
    python benchmarks/bench_recipe.py --quick        # smoke test: tiny runs on generated text

The baseline is ngpt run exactly as nanoGPT's CPU recipe (the quickstart's 2000 iterations at 4 x 128, block 64,
batch 12: bench_train.py's RECIPE, float32, eager, torch's default threads, glibc's malloc as it comes), which the
suite shows is nanoGPT's run to the digit. The contender is `ngpt train --preset shakespeare-char-fast-cpu` with
ngpt's automatic choices. Each side's wall time is its whole `ngpt train` process (start-up, evaluations and
saving included); each checkpoint's val loss is then measured on the same 200 val batches (`ngpt eval
--eval_iters 200 --block_size 64 --batch_size 12`, seed 1337), not on the runs' own 20-batch evaluations.
Target: the fast preset at a quarter of the baseline's wall time or less, at an equal or lower val loss.
The two trainings run one after the other, never at once; on a shared machine the ratio is the figure to read.

--ablation instead trains the fast preset with one key changed per row (ABLATION) and prints each row's
200-batch val loss against the preset's, as a Markdown table (the README's: `--ablation --threads 1`); wall
times are left out (they are not the point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_train import BASELINE, NGPT, RECIPE, RECIPE_QUICK, choices, default_threads, env_for, load, prepare_data, run

FAST = ["--preset", "shakespeare-char-fast-cpu"]
FAST_QUICK = [*FAST, "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
              "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=10", "--eval_iters=2"]
EVAL = ["--init_from=resume", "--dataset=shakespeare_char", "--device=cpu", "--block_size=64", "--batch_size=12",
        "--json"]
WALL_TARGET = 4.0
ADAMW = ["--optimizer=adamw", "--learning_rate=4e-3", "--beta1=0.9", "--beta2=0.99"]
ABLATION = [
    ("the preset as shipped", []),
    ("the preset, --seed=2", ["--seed=2"]),
    ("--position=learned", ["--position=learned"]),
    ("--no-embedding_norm", ["--no-embedding_norm"]),
    ("--no-qk_norm", ["--no-qk_norm"]),
    ("--tie_embeddings", ["--tie_embeddings"]),
    ("--muon_momentum=0.95", ["--muon_momentum=0.95"]),
    ("--muon_ns_steps=4", ["--muon_ns_steps=4"]),
    ("--activation=relu2", ["--activation=relu2"]),
    ("--lr_schedule=cosine --min_lr=0.0004", ["--lr_schedule=cosine", "--min_lr=0.0004"]),
    ("--logit_softcap=15", ["--logit_softcap=15"]),
    ("--no-zero_init_proj", ["--no-zero_init_proj"]),
    ("--norm=rmsnorm", ["--norm=rmsnorm"]),
    (" ".join(ADAMW) + " (no Muon)", ADAMW),
    ("GPT-2 at the same budget (no option, AdamW as above)",
     [*ADAMW, "--position=learned", "--no-qk_norm", "--no-embedding_norm", "--tie_embeddings", "--no-zero_init_proj"]),
]


def train_and_evaluate(side: str, args: list[str], threads: int, work: Path, eval_iters: int,
                       train_threads: int | None = None) -> dict:
    """One side: `ngpt train` timed as a whole, then `ngpt eval` of its checkpoint on eval_iters val batches (both
    on train_threads threads when given)."""
    out, log = work / f"{side}-out", work / f"{side}.log"
    env = env_for(side, threads, work)
    if train_threads:
        env["NGPT_THREADS"] = str(train_threads)
    wall = run([*NGPT, "train", *args, *(BASELINE if side == "baseline" else []), f"--out_dir={out}"], env, log)
    eval_log = work / f"{side}-eval.log"
    eval_env = env_for("ngpt", threads, work)
    if train_threads:
        eval_env["OMP_NUM_THREADS"] = str(train_threads)
    run([*NGPT, "eval", f"--out_dir={out}", *EVAL, f"--eval_iters={eval_iters}"], eval_env, eval_log)
    report = json.loads(eval_log.read_text(encoding="utf-8").strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    iters = max(r["iter"] for r in records if "loss" in r) + 1
    return {"side": side, "wall_s": wall, "val_loss": report["val_loss"], "train_iters": iters,
            "choices": choices(log)}


def ablation(threads: int, work: Path, eval_iters: int, quick: bool, train_threads: int | None) -> None:
    """The fast preset with one change per row: a Markdown table of 200-batch val losses against the preset's."""
    base = FAST_QUICK if quick else FAST
    print("| change from the preset | val loss | vs the preset |\n|---|---|---|", flush=True)
    reference = None
    for row, (label, change) in enumerate(ABLATION):
        r = train_and_evaluate(f"ablation-{row}", [*base, *change], threads, work, eval_iters, train_threads)
        reference = r["val_loss"] if reference is None else reference
        delta = "" if row == 0 else f"{r['val_loss'] - reference:+.3f}"
        print(f"| {label} | {r['val_loss']:.4f} | {delta} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny runs on generated text: a smoke test")
    ap.add_argument("--corpus", help="Tiny Shakespeare's input.txt (default: $NGPT_TEST_SHAKESPEARE)")
    ap.add_argument("--workdir", help="keep data, logs and runs here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--ablation", action="store_true", help="the table of one change per row instead")
    ap.add_argument("--threads", type=int, help="--ablation: train on this many threads (the losses hardly "
                    "depend on it; 1 keeps a shared machine usable)")
    args = ap.parse_args()
    corpus = args.corpus or os.environ.get("NGPT_TEST_SHAKESPEARE")
    if not args.quick and not (corpus and Path(corpus).is_file()):
        sys.exit("the recipe needs Tiny Shakespeare: set NGPT_TEST_SHAKESPEARE or pass --corpus (or --quick)")
    with tempfile.TemporaryDirectory(prefix="ngpt-bench-recipe-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        threads = default_threads()
        print(f"work folder {work}; baseline threads {threads} (torch's default); {load()}", flush=True)
        prepare_data(work, Path(corpus) if corpus and not args.quick else None, args.quick)
        eval_iters = 2 if args.quick else 200
        if args.ablation:
            ablation(threads, work, eval_iters, args.quick, args.threads)
            return 0
        return compare(threads, work, eval_iters, args.quick, args.json)


def compare(threads: int, work: Path, eval_iters: int, quick: bool, as_json: bool) -> int:
    """The baseline, then the fast preset; their wall times, val losses and the ratio."""
    sides = {"baseline": RECIPE_QUICK if quick else RECIPE, "fast": FAST_QUICK if quick else FAST}
    results = {}
    for side, train_args in sides.items():
        print(f"\n{side}: ngpt train {' '.join(train_args)}", flush=True)
        r = results[side] = train_and_evaluate(side, train_args, threads, work, eval_iters)
        print(f"  wall {r['wall_s']:.1f} s for {r['train_iters']} iterations, val loss {r['val_loss']:.4f} on "
              f"{eval_iters} batches ({load()})\n  {r['choices']}", flush=True)
    base, fast = results["baseline"], results["fast"]
    ratio = base["wall_s"] / fast["wall_s"]
    met = ratio >= WALL_TARGET and fast["val_loss"] <= base["val_loss"]
    print(f"\nwall-time ratio baseline/fast {ratio:.2f}x (target >= {WALL_TARGET:.0f}x); val loss fast "
          f"{fast['val_loss']:.4f} vs baseline {base['val_loss']:.4f} (target: equal or lower): "
          f"{'met' if met else 'NOT met'}")
    if as_json:
        print(json.dumps({"quick": quick, "wall_ratio": ratio, "met": met, **results}))
    return 0 if met or quick else 1

if __name__ == "__main__":
    sys.exit(main())
