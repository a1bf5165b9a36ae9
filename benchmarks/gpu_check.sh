#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a machine with an NVIDIA GPU (estimated 6 minutes on an H100/H200):
#
#   bash benchmarks/gpu_check.sh [FOLDER]      # from the repository root; results land in FOLDER (default gpu-check)
#
# 1. `ngpt info`: the GPU, torch, CUDA.
# 2. The tests marked `gpu` (tests/*): training with cuda's automatic choices, resume, a cuda checkpoint sampled
#    on cpu, `ngpt bench` on cuda, SDPA against the explicit attention, the KV cache.
# 3. `ngpt bench` of GPT-2 124M in nanoGPT's bench.py shape (batch 12, block 1024, no accumulation) with ngpt's
#    own choices (bf16 autocast, torch.compile, fused AdamW, SDPA's flash kernel, TF32): ms/iter, tokens/s,
#    MFU against the data-sheet peak, peak memory. The target: MFU >= 50% on an H100.
# 4. The same shape with --compare compile=False,True: what compiling buys there.
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

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all parts passed; results in $out/"
