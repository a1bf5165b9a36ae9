"""Zero-shot HellaSwag and LAMBADA accuracy of a checkpoint or any importable GPT-2.

    ngpt eval --init_from=gpt2 --task hellaswag --task lambada
    ngpt eval --out_dir=out/gpt2-124m --task hellaswag --hellaswag-file hellaswag_val.jsonl --limit 500

Both benchmarks are scored the way the GPT-2-era reports score them (karpathy's llm.c and
build-nanogpt `hellaswag.py`, EleutherAI's `lambada_openai`): every candidate continuation
is appended to its context, and only the continuation's tokens are scored.

* HellaSwag (`hellaswag_val.jsonl`, 10,042 items): context `ctx` + (" " + ending) for each of
  the 4 endings; `accuracy` picks the ending with the highest summed log-likelihood,
  `accuracy_norm` (the headline) the highest mean log-likelihood per token.
* LAMBADA (OpenAI's `lambada_test.jsonl`, 5,153 passages): the last word (after the last
  space) is the target; a passage counts when greedy decoding reproduces every token of
  " " + word. `perplexity` is exp of the mean negative log-likelihood of the whole word.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt_cli.atomic import check_regular
from nanogpt_cli.errors import NgptError, UsageError

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"


@dataclass(frozen=True)
class Benchmark:
    name: str
    url: str
    filename: str  # the name under cache_dir()/benchmarks/

    @property
    def option(self) -> str:
        return f"--{self.name}-file"


BENCHMARKS = {
    "hellaswag": Benchmark("hellaswag", HELLASWAG_URL, "hellaswag_val.jsonl"),
    "lambada": Benchmark("lambada", LAMBADA_URL, "lambada_test.jsonl"),
}
TASKS = tuple(BENCHMARKS)


@dataclass
class HellaSwagItem:
    ctx: str
    endings: list[str]
    label: int


@dataclass
class LambadaItem:
    context: str  # the passage up to its last space
    word: str  # the last word, without the space


# ---------------------------------------------------------------------------------------------
# Files: find or download, then read with errors that name the file and line.


def parse_tasks(values: list[str] | None) -> list[str]:
    """`--task hellaswag --task lambada` or `--task hellaswag,lambada` -> known names, in order, once each."""
    tasks: list[str] = []
    for value in values or []:
        for name in filter(None, (part.strip().lower() for part in value.split(","))):
            if name not in BENCHMARKS:
                raise UsageError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
            if name not in tasks:
                tasks.append(name)
    return tasks


def benchmark_file(task: str, path: str | os.PathLike | None = None) -> Path:
    """The benchmark's file: `path` when given, else the cached download (fetched on first use)."""
    bench = BENCHMARKS[task]
    if path is not None:
        file = Path(path).expanduser()
        if file.is_dir():
            raise UsageError(f"{bench.option} {path} is a folder; it needs the {bench.filename} file")
        if not file.exists():
            raise UsageError(f"no such file: {path} ({bench.option})")
        check_regular(file, f"{bench.option} {path}")  # a FIFO would block, a device never end
        return file
    from nanogpt_cli.atomic import download
    from nanogpt_cli.config import cache_dir
    from nanogpt_cli.progress import console

    target = cache_dir() / "benchmarks" / bench.filename
    if not target.is_file():
        console.print(f"downloading {bench.url} -> {target}")
        download(bench.url, target, bench.option)
    return target


def _records(path: str | os.PathLike, limit: int | None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for the first `limit` non-blank lines of a JSON-lines file."""
    from nanogpt_cli.config import cache_dir

    path = Path(path)
    hint = " (a cached download: delete it to fetch it again)" if cache_dir() in path.parents else ""
    count = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and count >= limit:
                    return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NgptError(f"{path}:{lineno}: not a JSON line ({e.msg}){hint}") from None
                if not isinstance(record, dict):
                    raise NgptError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}{hint}")
                count += 1
                yield lineno, record
    except UnicodeDecodeError:
        raise NgptError(f"{path} is not UTF-8 text{hint}") from None
    except OSError as e:
        raise NgptError(f"could not read {path}: {e.strerror or e}") from None
    if count == 0:
        raise NgptError(f"{path} holds no examples (an empty file){hint}")


def read_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[HellaSwagItem]:
    """HellaSwag's JSON lines (`ctx`, `endings`, `label`, ...), as in rowanz/hellaswag's hellaswag_val.jsonl."""
    items = []
    for lineno, record in _records(path, limit):
        where = f"{path}:{lineno}"
        ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
        if not isinstance(ctx, str):
            raise NgptError(f"{where}: no 'ctx' text; is this a HellaSwag file ({BENCHMARKS['hellaswag'].filename})?")
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
            raise NgptError(f"{where}: 'endings' must be a list of candidate strings")
        if label is None:
            raise NgptError(f"{where}: no 'label' (HellaSwag's test split is unlabelled; use "
                            f"{BENCHMARKS['hellaswag'].filename})")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise NgptError(f"{where}: 'label' must be an ending's index, 0 to {len(endings) - 1}, got {label!r}")
        items.append(HellaSwagItem(ctx, endings, label))
    return items


def read_lambada(path: str | os.PathLike, limit: int | None = None) -> list[LambadaItem]:
    """LAMBADA as OpenAI processed it for GPT-2: one {"text": passage} per line."""
    items = []
    for lineno, record in _records(path, limit):
        text = record.get("text")
        if not isinstance(text, str):
            raise NgptError(f"{path}:{lineno}: no 'text' string; is this a LAMBADA file "
                            f"({BENCHMARKS['lambada'].filename})?")
        context, _, word = text.rpartition(" ")
        if not context or not word:
            raise NgptError(f"{path}:{lineno}: the passage needs a context and a last word after a space")
        items.append(LambadaItem(context, word))
    return items


READERS = {"hellaswag": read_hellaswag, "lambada": read_lambada}


# ---------------------------------------------------------------------------------------------
# Scoring.


@dataclass
class Scored:
    logprobs: list[float]  # log p(token | everything before it), one per scored continuation token
    greedy: bool  # every scored token is the model's argmax at its position


def fit_window(context: list[int], continuation: list[int], block_size: int, bos: int) -> tuple[list[int], int]:
    """(tokens, n): context + continuation cut to the last block_size tokens, and how many of the
    final tokens to score (the continuation's, less any that fell off the window's start).
    An empty context starts with `bos` so that the first continuation token has a prediction."""
    tokens = ((context or [bos]) + continuation)[-block_size:]
    return tokens, min(len(continuation), len(tokens) - 1)


@torch.no_grad()
def score(model, rows: list[tuple[list[int], int]], device: torch.device, dtype: str) -> list[Scored]:
    """One forward over all rows, right-padded (causal attention keeps the padding out of every
    real position); the log-likelihood and greedy match of each row's last n tokens."""
    from nanogpt_cli.runtime import autocast

    T = max(len(tokens) for tokens, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    row_of, pos_of = [], []  # (row, position) of each prediction that is scored
    for i, (tokens, n) in enumerate(rows):
        idx[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        row_of += [i] * n
        pos_of += range(len(tokens) - n - 1, len(tokens) - 1)  # position t predicts token t + 1
    idx = idx.to(device)
    with autocast(device, dtype):
        logits, _ = model(idx, all_logits=True)  # (B, T, V)
    r = torch.tensor(row_of, dtype=torch.long, device=device)
    p = torch.tensor(pos_of, dtype=torch.long, device=device)
    logp = logits[r, p].float().log_softmax(-1)  # (N, V): only the scored positions, in float32
    targets = idx[r, p + 1]  # (N,)
    token_logp = logp.gather(1, targets[:, None]).squeeze(1).cpu().tolist()
    hits = (logp.argmax(-1) == targets).cpu().tolist()
    out, start = [], 0
    for _, n in rows:
        out.append(Scored(token_logp[start:start + n], all(hits[start:start + n])))
        start += n
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def eval_hellaswag(model, tokenizer, items: list[HellaSwagItem], device, dtype: str, block_size: int,
                   batch_size: int = 16, progress=None) -> dict:
    """`accuracy` (summed log-likelihood) and `accuracy_norm` (per-token mean) over the items;
    each item's endings are scored in one forward (several items per forward for batch_size >= 8)."""
    correct = correct_norm = 0
    for chunk in _chunks(items, max(1, batch_size // 4)):
        rows = []
        for item in chunk:
            ctx = tokenizer.encode(item.ctx)
            rows += [fit_window(ctx, tokenizer.encode(" " + ending), block_size, tokenizer.eot_token)
                     for ending in item.endings]
        scored = iter(score(model, rows, device, dtype))
        for item in chunk:
            endings = [next(scored) for _ in item.endings]
            sums = [sum(s.logprobs) for s in endings]
            means = [total / max(1, len(s.logprobs)) for total, s in zip(sums, endings, strict=True)]
            correct += max(range(len(sums)), key=sums.__getitem__) == item.label  # first of ties, as argmax
            correct_norm += max(range(len(means)), key=means.__getitem__) == item.label
        if progress is not None:
            progress(len(chunk))
    n = len(items)
    return {"examples": n, "accuracy": correct / n, "accuracy_norm": correct_norm / n,
            "correct": correct, "correct_norm": correct_norm}


def eval_lambada(model, tokenizer, items: list[LambadaItem], device, dtype: str, block_size: int,
                 batch_size: int = 16, progress=None) -> dict:
    """Last-word `accuracy` (greedy decoding reproduces every token of the word) and the word's perplexity."""
    correct, total_logp = 0, 0.0
    for chunk in _chunks(items, max(1, batch_size)):
        rows = [fit_window(tokenizer.encode(item.context), tokenizer.encode(" " + item.word), block_size,
                           tokenizer.eot_token) for item in chunk]
        for s in score(model, rows, device, dtype):
            correct += s.greedy
            total_logp += sum(s.logprobs)
        if progress is not None:
            progress(len(chunk))
    n = len(items)
    return {"examples": n, "accuracy": correct / n, "correct": correct,
            "perplexity": math.exp(min(-total_logp / n, 700.0)), "mean_logprob": total_logp / n}


EVALUATORS = {"hellaswag": eval_hellaswag, "lambada": eval_lambada}


# ---------------------------------------------------------------------------------------------
# The command.


def benchmark_tokenizer(meta: dict, vocab_size: int):
    """The model's own BPE tokenizer; a character-level or unknown one cannot read these benchmarks."""
    from nanogpt_cli.tokenizer import from_meta

    name = meta.get("tokenizer")
    if name == "char":
        raise NgptError("zero-shot benchmarks need a BPE model (GPT-2's tokenizer); this model is character-level, "
                        f"with a {meta.get('vocab_size', '?')}-character vocabulary")
    if not name:
        raise NgptError("the model's tokenizer is unknown (no ngpt metadata and not GPT-2's vocabulary size); "
                        "zero-shot benchmarks need a GPT-2 BPE model")
    tokenizer = from_meta(meta)
    if tokenizer.vocab_size > vocab_size:
        raise NgptError(f"the model's vocabulary ({vocab_size}) is smaller than its tokenizer's "
                        f"({name}, {tokenizer.vocab_size})")
    return tokenizer


def zeroshot(cfg, tasks: list[str], files: dict[str, str | None] | None = None, limit: int | None = None,
             loaded: tuple | None = None) -> dict:
    """Zero-shot results of cfg.init_from on each task: {"model", "block_size", task: {...}}.
    Files are found (or downloaded) and read before the model loads, so bad input fails fast.
    `loaded`: the model's (model, meta) when the caller has loaded it already."""
    from nanogpt_cli.checkpoint import load_model
    from nanogpt_cli.precision import cpu_linears
    from nanogpt_cli.runtime import plan

    files = files or {}
    paths = {task: benchmark_file(task, files.get(task)) for task in tasks}
    data = {task: READERS[task](paths[task], limit) for task in tasks}
    model, meta = loaded or load_model(cfg.init_from, cfg.out_dir)[:2]
    tokenizer = benchmark_tokenizer(meta, model.config.vocab_size)
    runtime = plan(cfg.device, cfg.dtype)
    device, dtype = runtime.device, runtime.dtype
    cpu_linears(model.to(device).eval(), device)
    block_size = min(cfg.block_size or model.config.block_size, model.config.block_size)
    report: dict = {"model": cfg.init_from if cfg.init_from != "resume" else cfg.out_dir, "block_size": block_size}
    for task in tasks:
        with _Progress(task, len(data[task])) as progress:
            result = EVALUATORS[task](model, tokenizer, data[task], device, dtype, block_size, cfg.batch_size,
                                      progress)
        report[task] = {**result, "file": str(paths[task])}
    return report


class _Progress:
    """A transient bar on a terminal; a start line elsewhere (logs go to stderr)."""

    def __init__(self, task: str, total: int):
        self.task, self.total, self.bar = task, total, None

    def __enter__(self):
        from nanogpt_cli.progress import console, is_interactive

        if is_interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.task), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=console, transient=True)
            self.bar.__enter__()
            self.id = self.bar.add_task(self.task, total=self.total)
        else:
            console.print(f"{self.task}: {self.total} examples")
        return self

    def __call__(self, advance: int) -> None:
        if self.bar is not None:
            self.bar.update(self.id, advance=advance)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
