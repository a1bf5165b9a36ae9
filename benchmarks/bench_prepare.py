"""Benchmark `ngpt prepare text`: tokens/s against a plain tiktoken loop, peak memory at 1 GB, and training
a BPE of one's own (`--tokenizer bpe:N`): its time and peak memory, and its encoding against GPT-2's.

    python benchmarks/bench_prepare.py                 # 100 MB of JSONL documents: throughput and ratio
    python benchmarks/bench_prepare.py --size-gb 1     # also: one 1 GB .txt file, peak RSS of the run
    python benchmarks/bench_prepare.py --bpe 8192      # 100 MB of Shakespeare: train bpe:8192, encode vs gpt2
    python benchmarks/bench_prepare.py --bpe 8192 --size-mb 1000 --tokenizer-sample 100MB --no-gpt2

Both sides read the same generated corpus. The baseline is the simplest correct loop, one process,
`enc.encode_ordinary(doc)` per document (reading and JSON parsing included, writing not); `ngpt
prepare text` runs in a subprocess, start-up, the val split and writing train.bin/val.bin included.
The subprocess reports its own peak RSS (getrusage, all threads) as it exits. Needs the GPT-2 BPE files
(they download on first use, or set TIKTOKEN_CACHE_DIR).

--bpe N writes --size-mb of text made from Tiny Shakespeare (its speeches shuffled, over and over; the
corpus from NGPT_TEST_SHAKESPEARE or --shakespeare) into the temporary folder and runs three
`ngpt prepare text` on it: with gpt2 (today's encoding), with bpe:N (training, then encoding), and
with the trained tokenizer.json (encoding only). Training takes the difference of the last two.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `ngpt prepare` itself (without depending on the top-level CLI module); on the way out it reports
# its own peak RSS (all threads) on stderr
PREPARE = [sys.executable, "-c", """
import resource, sys
from nanogpt_cli.cli_data import prepare_app
try:
    prepare_app()
finally:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("peak_rss_kb", usage.ru_maxrss, "cpu_s", usage.ru_utime + usage.ru_stime, file=sys.stderr)
"""]


def make_words(rng: random.Random, n: int = 20000) -> list[str]:
    """Pseudo-English words from syllables, so BPE sees realistic word lengths and a long tail."""
    syllables = ["th", "e", "an", "re", "in", "on", "at", "er", "es", "or", "ti", "ng", "al", "st", "ou", "is",
                 "ar", "ed", "le", "co", "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce", "li", "ch"]
    return ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))) for _ in range(n)]


def make_document(rng: random.Random, words: list[str], n_words: int) -> str:
    # Zipf-like word choice: frequent short words, a long tail, like real text
    picks = [words[min(int(rng.paretovariate(1.1)) - 1, len(words) - 1)] for _ in range(n_words)]
    out = []
    for i, word in enumerate(picks):
        out.append(word.capitalize() if i == 0 or out[-1].endswith((". ", "\n\n")) else word)
        r = rng.random()
        out.append(". " if r < 0.06 else ", " if r < 0.12 else "\n\n" if r < 0.13 else " ")
    return "".join(out).strip() + "\n"


def write_jsonl(path: Path, size_bytes: int, seed: int = 0) -> int:
    """OpenWebText-like documents (about 5 KB each) as JSONL; returns the document count."""
    rng = random.Random(seed)
    words = make_words(rng)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < size_bytes:
            f.write(json.dumps({"text": make_document(rng, words, rng.randint(200, 1800))}) + "\n")
            count += 1
    return count


def write_big_text(path: Path, size_bytes: int, seed: int = 0) -> None:
    """One large .txt file: 16 distinct 4 MB blocks in random order, until `size_bytes`."""
    rng = random.Random(seed)
    words = make_words(rng)
    blocks = []
    for _ in range(16):
        parts, n = [], 0
        while n < 4_000_000:
            parts.append(make_document(rng, words, 2000))
            n += len(parts[-1])
        blocks.append("".join(parts))
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < size_bytes:
            f.write(rng.choice(blocks))


def baseline(path: Path) -> tuple[int, float, float]:
    """The plain loop: one process, one document at a time. Returns (tokens, seconds, CPU seconds)."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens += len(enc.encode_ordinary(json.loads(line)["text"])) + 1  # + the EOT prepare appends
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def write_shakespeare(path: Path, source: Path, size_bytes: int, seed: int = 0) -> None:
    """Tiny Shakespeare's speeches (blocks between blank lines) in a new random order each pass, until
    `size_bytes`: a large corpus with Shakespeare's words and their frequencies."""
    rng = random.Random(seed)
    speeches = [s.strip("\n") + "\n\n" for s in re.split(r"\n\s*\n", source.read_text(encoding="utf-8")) if s.strip()]
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < size_bytes:
            rng.shuffle(speeches)
            f.write("".join(speeches))


def run_prepare(path: Path, data_dir: Path, name: str, *options: str) -> tuple[dict, float, float, float]:
    """`ngpt prepare text PATH` in a subprocess: (meta.json, seconds, CPU seconds, peak RSS in GiB)."""
    start = time.perf_counter()
    done = subprocess.run([*PREPARE, "text", str(path), "--data-dir", str(data_dir), "--name", name, "--force",
                           "--quiet", *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"ngpt prepare text failed:\n{done.stderr}")
    report = done.stderr.split("peak_rss_kb")[-1].split()
    peak_kb, cpu = int(report[0]), float(report[2])  # ru_maxrss is in KB on Linux
    meta = json.loads((data_dir / name / "meta.json").read_text())
    return meta, seconds, cpu, peak_kb * 1024 / 2**30


def bench_bpe(args: argparse.Namespace, tmp: Path) -> None:
    """Train bpe:N on --size-mb of Shakespeare text, then compare its encoding with GPT-2's on the same file."""
    source = Path(args.shakespeare or os.environ.get("NGPT_TEST_SHAKESPEARE", ""))
    if not source.is_file():
        sys.exit("--bpe needs Tiny Shakespeare's input.txt: --shakespeare PATH or NGPT_TEST_SHAKESPEARE")
    corpus = tmp / "shakespeare.txt"
    write_shakespeare(corpus, source, int(args.size_mb * 1e6))
    size = corpus.stat().st_size
    print(f"corpus: {size / 1e6:.0f} MB of shuffled Tiny Shakespeare; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")

    def report(label: str, seconds: float, cpu: float, rss: float, meta: dict | None = None) -> None:
        tokens = f", {sum(s['tokens'] for s in meta['splits'].values()):,} tokens" if meta else ""
        print(f"{label:<44} {seconds:7.1f} s (CPU {cpu:6.1f} s) {size / seconds / 1e6:6.2f} MB/s of text, "
              f"peak RSS {rss:.2f} GiB{tokens}")

    if not args.no_gpt2:
        meta, seconds, cpu, rss = run_prepare(corpus, tmp / "data", "gpt2")
        report("prepare --tokenizer gpt2 (today's encoding)", seconds, cpu, rss, meta)
    sample = ["--tokenizer-sample", args.tokenizer_sample] if args.tokenizer_sample else []
    meta, trained_seconds, trained_cpu, rss = run_prepare(corpus, tmp / "data", "bpe", "--tokenizer",
                                                          f"bpe:{args.bpe}", *sample)
    report(f"prepare --tokenizer bpe:{args.bpe} {' '.join(sample)}".strip(), trained_seconds, trained_cpu, rss, meta)
    tokenizer = tmp / "data" / "bpe" / "tokenizer.json"
    meta, seconds, cpu, rss = run_prepare(corpus, tmp / "data", "reuse", "--tokenizer", str(tokenizer))
    report("prepare --tokenizer tokenizer.json (encode)", seconds, cpu, rss, meta)
    print(f"training bpe:{args.bpe}{' ' * bool(sample)}{' '.join(sample)}: about {trained_seconds - seconds:.1f} s "
          f"(CPU {trained_cpu - cpu:.1f} s), the difference of the last two")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100, help="corpus for the throughput comparison")
    parser.add_argument("--size-gb", type=float, default=0, help="also prepare one .txt file this big, for peak RSS")
    parser.add_argument("--bpe", type=int, default=0, metavar="N", help="benchmark training bpe:N instead")
    parser.add_argument("--tokenizer-sample", default=None, help="with --bpe: train on this much, e.g. 100MB")
    parser.add_argument("--no-gpt2", action="store_true", help="with --bpe: skip the gpt2 encoding run")
    parser.add_argument("--shakespeare", default=None, help="with --bpe: Tiny Shakespeare's input.txt")
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    args = parser.parse_args()

    if args.bpe:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            bench_bpe(args, Path(tmp))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "docs.jsonl"
        docs = write_jsonl(corpus, int(args.size_mb * 1e6))
        print(f"corpus: {corpus.stat().st_size / 1e6:.0f} MB, {docs:,} JSONL documents; {os.cpu_count()} cores")
        base_tokens, base_seconds, base_cpu = baseline(corpus)
        print(f"plain tiktoken loop (1 process): {base_tokens:,} tokens in {base_seconds:.1f} s "
              f"(CPU {base_cpu:.1f} s) = {base_tokens / base_seconds / 1e6:.2f} M tokens/s")
        meta, seconds, cpu, rss = run_prepare(corpus, tmp / "data", "docs")
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        assert tokens == base_tokens, (tokens, base_tokens)
        print(f"ngpt prepare text:               {tokens:,} tokens in {seconds:.1f} s "
              f"(CPU {cpu:.1f} s) = {tokens / seconds / 1e6:.2f} M tokens/s, peak RSS {rss:.2f} GiB")
        print(f"ratio: {base_seconds / seconds:.2f}x the plain loop's tokens/s "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work competes)")

        if args.size_gb:
            big = tmp / "big.txt"
            write_big_text(big, int(args.size_gb * 1e9))
            corpus.unlink()
            meta, seconds, cpu, rss = run_prepare(big, tmp / "data", "big")
            tokens = sum(s["tokens"] for s in meta["splits"].values())
            print(f"one {big.stat().st_size / 1e9:.2f} GB .txt file: {tokens:,} tokens in {seconds:.1f} s "
                  f"(CPU {cpu:.1f} s) = {tokens / seconds / 1e6:.2f} M tokens/s, peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
