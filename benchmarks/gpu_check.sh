#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a machine with an NVIDIA GPU (estimated 9 minutes on an H100/H200):
#
#   bash benchmarks/gpu_check.sh [FOLDER]      # from the repository root; results land in FOLDER (default gpu-check)
#
# 1. `ngpt info`: the GPU, torch, CUDA.
# 2. The tests marked `gpu` (tests/*): training with cuda's automatic choices, resume, a cuda checkpoint sampled
#    on cpu, `ngpt bench` on cuda, SDPA against the explicit attention, the KV cache.
# 3. `ngpt bench` of GPT-2 124M in nanoGPT's bench.py shape (batch 12, block 1024, no accumulation) with ngpt's
#    own choices (bf16 autocast, torch.compile, fused AdamW, SDPA's flash kernel, TF32): ms/iter, tokens/s,
#    MFU against the data-sheet peak, peak memory. The issue's target: MFU >= 50% on an H100.
# 4. The same shape with --compare compile=False,True: what compiling buys there.
# 5. The modern recipe on one GPU: `ngpt train --preset shakespeare-char-fast` on Tiny Shakespeare (from
#    $NGPT_TEST_SHAKESPEARE when set, else downloaded), and the seconds from the process's start to the first
#    evaluation at or below nanoGPT's best val loss 1.4697 (target: 60 s or less); then `ngpt bench` of the
#    gpt2-124m-fast preset (GPT-2 124M with the modern recipe and Muon) on synthetic tokens, one GPU's share.
#
# Needs the package importable (`pip install -e .`, or PYTHONPATH=.) and torch with CUDA. Set PYTHON to choose
# the interpreter. Exits non-zero if any part failed; every part runs regardless.
set -uo pipefail
out="${1:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 NO_COLOR=1
export NGPT_DATA_DIR="${NGPT_DATA_DIR:-${TMPDIR:-/tmp}/ngpt-gpu-check/data}"
export NGPT_CACHE_DIR="${NGPT_CACHE_DIR:-${TMPDIR:-/tmp}/ngpt-gpu-check/cache}"
failed=()

part() {  # part NAME LOG COMMAND...: run COMMAND with its output in LOG (and on the screen), note a failure
  local name=$1 log=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA GPU here')" || exit 1
"$py" -c "import nanogpt_cli.cli, pytest" || { echo "ngpt or pytest is not importable: pip install -e '.[dev]' (or PYTHONPATH=.)"; exit 1; }
part info "$out/info.txt" "$py" -m nanogpt_cli info
part tests "$out/tests.txt" "$py" -m pytest -q -m gpu -ra -p no:cacheprovider tests

gpt2=(--preset gpt2-124m --data synthetic --batch_size=12 --block_size=1024 --gradient_accumulation_steps=1
      --out_dir="${TMPDIR:-/tmp}/ngpt-gpu-check/out")
part bench "$out/bench.txt" "$py" -m nanogpt_cli bench "${gpt2[@]}" --iters 200 --warmup 20 --json  # JSON: last line
part compare "$out/compare.txt" "$py" -m nanogpt_cli bench "${gpt2[@]}" --iters 50 --warmup 10 \
  --compare compile=False,True

corpus=()
[ -n "${NGPT_TEST_SHAKESPEARE:-}" ] && corpus=(--source "$NGPT_TEST_SHAKESPEARE")
part prepare "$out/prepare.txt" "$py" -m nanogpt_cli prepare shakespeare-char "${corpus[@]}" --quiet
fast="${TMPDIR:-/tmp}/ngpt-gpu-check/shakespeare-char-fast"
rm -rf "$fast"
start=$(date +%s.%N)
part shakespeare-char-fast "$out/shakespeare-char-fast.txt" "$py" -m nanogpt_cli train --preset shakespeare-char-fast \
  --out_dir="$fast"
part time-to-1.4697 "$out/time-to-1.4697.txt" "$py" - "$fast/metrics.jsonl" "$start" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_loss" in r]
best = min(r["val_loss"] for r in evals)
hit = next((r for r in evals if r["val_loss"] <= 1.4697), None)
print(f"best val loss {best:.4f} (nanoGPT's 1.4697) after {len(evals)} evaluations")
if hit is None:
    sys.exit("never reached 1.4697")
seconds = hit["time"] - float(sys.argv[2])
print(f"val {hit['val_loss']:.4f} <= 1.4697 at iteration {hit['iter']}, {seconds:.1f} s after the start (target <= 60 s)")
PY
part bench-gpt2-124m-fast "$out/bench-gpt2-124m-fast.txt" "$py" -m nanogpt_cli bench --preset gpt2-124m-fast \
  --data synthetic --gradient_accumulation_steps=4 --iters 50 --warmup 10 --json \
  --out_dir="${TMPDIR:-/tmp}/ngpt-gpu-check/out-fast"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all parts passed; results in $out/"
