"""Turn text into training tokens (train.bin, val.bin, meta.json), streaming, in bounded memory.

The plain functions behind `ngpt prepare ...`: `prepare_shakespeare_char`, `prepare_shakespeare`,
`prepare_openwebtext`, `prepare_text` and `prepare_hf` each describe a corpus and hand it to one
engine, `_prepare`, which streams documents in pieces, tokenizes them on a thread pool, appends
the tokens to files in a temporary folder and moves them into place when complete (meta.json
last). `list_datasets` and `dataset_info` read what was written, for `ngpt data`.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nanogpt_cli.config import cache_dir, resolve_data_dir
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.tokenizer import CharTokenizer, get_tokenizer

FORMAT = 1
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
OPENWEBTEXT_ID = "Skylion007/openwebtext"
# datasets >= 4 runs no loading scripts, and openwebtext is a script dataset: read the Hub's parquet export
OPENWEBTEXT_REVISION = "refs/convert/parquet"
TEXT_SUFFIXES = {".txt", ".text", ".md"}
FILE_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
READ_BYTES = 1 << 20  # large files are read a MiB at a time...
PIECE_CHARS = 1 << 20  # ...and tokenized in pieces of about a million characters
UNIT_CHARS = 1 << 20  # small documents are grouped into work units of about this size for the threads
PROGRESS_SECONDS = 10.0  # how often plain progress lines are printed when not on a terminal


@dataclass
class PrepareOptions:
    """What every `ngpt prepare` command shares."""

    name: str | None = None  # output folder under the data dir; each recipe has its default
    data_dir: str | os.PathLike | None = None  # None: $NGPT_DATA_DIR, else the per-user data folder
    tokenizer: str = "gpt2"  # "char", "gpt2" or any tiktoken encoding name
    val_fraction: float | None = None  # share of documents (of a single document's characters) held out for
    # val; None: the recipe's default, 0.0005 for openwebtext (nanoGPT's), 0.1 otherwise
    seed: int = 2357  # which documents go to val (nanoGPT's seed)
    force: bool = False  # rebuild even when the same sources and options were prepared already
    errors: str = "strict"  # invalid UTF-8: "strict" stops naming the file and byte, "replace" goes on
    append_eot: bool = True  # end every document with the end-of-text token (BPE only)
    num_threads: int = 0  # tokenizer threads; 0 means one per core
    quiet: bool = False  # no progress output


def dtype_for_vocab(vocab_size: int) -> str:
    """Token ids fit in uint16 up to GPT-2's 50257 entries; larger vocabularies (cl100k, o200k) need uint32."""
    return "uint32" if vocab_size > 65535 else "uint16"


# ---------------------------------------------------------------------------------------------
# Sources: a corpus is a stream of documents; a document is a stream of (text, progress) chunks.


class Document(NamedTuple):
    chunks: Iterable[tuple[str, float]]  # text in pieces, with how much progress each piece is worth
    split: str | None = None  # set when the source comes already split (openwebtext's recipe)


class Corpus:
    """Where the text comes from. `identity` is cheap (no reading) and feeds the fingerprint."""

    source = ""  # recorded in meta.json
    unit = "bytes"  # progress is counted in bytes read or in documents
    total: float | None = None  # progress total, when known
    single_document = False  # exactly one document, known before reading: split it by characters

    def identity(self) -> object:
        raise NotImplementedError

    def load(self, workdir: Path) -> None:
        """Open the source: slow work such as a download happens here, after the up-to-date check;
        `workdir` (the temporary output folder) takes any scratch files."""

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_text_chunks(path: Path, errors: str = "strict", chunk_bytes: int = 0) -> Iterator[tuple[str, int]]:
    """Decode a UTF-8 file a chunk at a time, yielding (text, bytes consumed); a character split
    across two chunks is carried over, and a bad byte is reported with its offset in the file."""
    pending, offset = b"", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes or READ_BYTES)
            data = pending + raw
            try:
                text, consumed = codecs.utf_8_decode(data, errors, not raw)
            except UnicodeDecodeError as e:
                raise NgptError(f"{path}: invalid UTF-8 at byte {offset + e.start} ({e.reason}); "
                                "pass --errors replace to replace bad bytes and go on") from None
            pending, offset = data[consumed:], offset + consumed
            if text or not raw:
                yield text, consumed
            if not raw:
                return


def _jsonl_documents(path: Path, text_field: str, errors: str) -> Iterator[Document]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise NgptError(f"{path}:{lineno}: invalid UTF-8 at byte {offset + e.start} ({e.reason}); "
                                "pass --errors replace to replace bad bytes and go on") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise NgptError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise NgptError(f"{path}:{lineno}: no {text_field!r} field (found: {fields}); "
                                "choose the field with --text-field")
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise NgptError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not text")
            yield Document([(text or "", len(raw))])


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise NgptError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise NgptError(f"{path}: no {text_field!r} column (found: {', '.join(names)}); "
                        "choose the column with --text-field")
    rows = max(pf.metadata.num_rows, 1)
    per_row = path.stat().st_size / rows  # progress is in bytes: share the file size among the rows
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise NgptError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield Document([(text or "", per_row)])


def _absolute(arg: str) -> str:
    """A path or glob as given, made absolute (for meta.json's source)."""
    return os.path.abspath(os.path.expanduser(arg))


def _looks_like_glob(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def resolve_paths(args: Iterable[str]) -> list[Path]:
    """Files from paths, folders (recursive; hidden entries skipped) and glob patterns, in a stable order."""
    files: list[Path] = []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UsageError(f"no .txt, .jsonl or .parquet files in folder {arg}")
            files += found
        elif path.exists():
            if path.suffix.lower() not in FILE_SUFFIXES:
                raise UsageError(f"{arg}: unsupported file type {path.suffix or '(none)'!r}; "
                                 "use .txt (or .md), .jsonl or .parquet files")
            files.append(path)
        elif _looks_like_glob(arg):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(arg), recursive=True))
            found = [p for p in found if p.is_file() and p.suffix.lower() in FILE_SUFFIXES]
            if not found:
                raise UsageError(f"no .txt, .jsonl or .parquet files match {arg}")
            files += found
        else:
            raise UsageError(f"no such file or folder: {arg}")
    unique = {p.resolve(): p for p in files}  # the same file named twice is read once
    return list(unique.values())


class FileCorpus(Corpus):
    """Local files: each text file is one document; each JSONL line or parquet row is one."""

    def __init__(self, paths: Iterable[str], text_field: str = "text", errors: str = "strict"):
        self.args = [str(p) for p in paths]
        if not self.args:
            raise UsageError("give at least one file, folder or glob")
        self.files = resolve_paths(self.args)
        self.text_field, self.errors = text_field, errors
        self.source = ", ".join(_absolute(a) for a in self.args)
        self.total = sum(p.stat().st_size for p in self.files)
        self.single_document = len(self.files) == 1 and self.files[0].suffix.lower() in TEXT_SUFFIXES

    def identity(self) -> object:
        return {"files": [_stat(p) for p in self.files], "text_field": self.text_field}

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _jsonl_documents(path, self.text_field, self.errors)
            elif suffix == ".parquet":
                yield from _parquet_documents(path, self.text_field)
            else:
                yield Document(read_text_chunks(path, self.errors))


def _dataset_documents(ds, text_field: str, where: str, split: str | None = None) -> Iterator[Document]:
    """Documents from a `datasets` Dataset or IterableDataset, a batch of rows at a time."""
    names = ds.column_names
    if names is not None and text_field not in names:
        raise NgptError(f"{where} has no {text_field!r} column (found: {', '.join(names)}); "
                        "choose the column with --text-field")
    try:
        for batch in ds.select_columns([text_field]).iter(batch_size=1000):
            for text in batch[text_field]:
                if text is not None and not isinstance(text, str):
                    raise NgptError(f"{where}: column {text_field!r} holds {type(text).__name__}, not text")
                yield Document([(text or "", 1)], split)
    except (NgptError, KeyboardInterrupt):
        raise
    except KeyError:
        raise NgptError(f"{where} has no {text_field!r} column; choose the column with --text-field") from None
    except Exception as e:  # network and format errors surface while streaming
        raise NgptError(f"could not read {where}: {_one_line(e)}") from None


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _folder_identity(path: Path) -> list:
    return [_stat(p) for p in sorted(path.rglob("*")) if p.is_file()]


def _hub_error(name: str, e: Exception) -> NgptError:
    return NgptError(f"could not load {name!r} ({type(e).__name__}: {_one_line(e)}); without network, "
                     "pass a local folder (saved with save_to_disk, or of .parquet/.jsonl files) instead")


class HFCorpus(Corpus):
    """Any Hugging Face dataset: a Hub id (streamed), a folder saved with `save_to_disk`, or a folder of data files."""

    unit = "docs"

    def __init__(self, name_or_path: str, config: str | None = None, split: str = "train",
                 text_field: str = "text", revision: str | None = None):
        self.name, self.config, self.split, self.revision = name_or_path, config, split, revision
        self.text_field = text_field
        self.path = Path(name_or_path).expanduser()
        if self.path.is_file():
            raise UsageError(f"{name_or_path} is a file; `prepare hf` takes a Hub id or a folder "
                             "(for files use `ngpt prepare text`)")
        self.local = self.path.is_dir()
        self.source = str(self.path.resolve()) if self.local else name_or_path

    def identity(self) -> object:
        where = _folder_identity(self.path) if self.local else self.name
        return {"hf": where, "config": self.config, "split": self.split, "revision": self.revision,
                "text_field": self.text_field}

    def load(self, workdir: Path) -> None:
        import datasets

        try:
            if self.local and _is_saved_dataset(self.path):
                ds = datasets.load_from_disk(str(self.path))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise UsageError(f"{self.name} has no split {self.split!r} (splits: {', '.join(ds)}); "
                                         "choose one with --split")
                    ds = ds[self.split]
            else:  # stream: never download or convert the whole dataset first
                ds = datasets.load_dataset(str(self.path) if self.local else self.name, self.config,
                                           split=self.split, revision=self.revision, streaming=True)
        except NgptError:
            raise
        except Exception as e:
            raise _hub_error(self.name, e) from None
        self.dataset = ds
        self.total = len(ds) if hasattr(ds, "__len__") else None

    def documents(self) -> Iterator[Document]:
        return _dataset_documents(self.dataset, self.text_field, self.name)


class OpenWebTextCorpus(Corpus):
    """nanoGPT's openwebtext recipe: the whole train split, then `train_test_split` into train and val."""

    unit = "docs"

    def __init__(self, dataset_id: str, revision: str | None, data_files: list[str] | None,
                 num_proc: int | None, val_fraction: float, seed: int, text_field: str = "text"):
        self.dataset_id, self.revision, self.num_proc, self.text_field = dataset_id, revision, num_proc, text_field
        self.val_fraction, self.seed = val_fraction, seed
        self.files = resolve_paths(data_files) if data_files else None
        self.path = Path(dataset_id).expanduser()
        if self.path.is_file():
            raise UsageError(f"--dataset-id {dataset_id} is a file; give a Hub id or a folder, "
                             "or pass files with --data-files")
        self.source = ", ".join(map(_absolute, data_files)) if data_files else (
            str(self.path.resolve()) if self.path.is_dir() else dataset_id)

    def identity(self) -> object:
        if self.files:
            return {"data_files": [_stat(p) for p in self.files], "text_field": self.text_field}
        if self.path.is_dir():
            return {"folder": _folder_identity(self.path), "text_field": self.text_field}
        return {"hf": self.dataset_id, "revision": self.revision, "text_field": self.text_field}

    def load(self, workdir: Path) -> None:
        import datasets

        try:
            if self.files:
                builder = {".jsonl": "json", ".parquet": "parquet"}.get(self.files[0].suffix.lower(), "text")
                ds = datasets.load_dataset(builder, data_files=[str(p) for p in self.files], split="train",
                                           num_proc=self.num_proc)
            elif self.path.is_dir() and _is_saved_dataset(self.path):
                ds = datasets.load_from_disk(str(self.path))
                ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(str(self.path) if self.path.is_dir() else self.dataset_id,
                                           split="train", revision=self.revision, num_proc=self.num_proc)
        except Exception as e:
            raise _hub_error(self.dataset_id, e) from None
        if len(ds) < 2:
            raise NgptError(f"{self.source}: {len(ds)} document(s); need at least 2 to split into train and val")
        # the shuffled indices (8 bytes a row) go to the scratch folder, not next to the user's data
        parts = ds.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True,
                                    train_indices_cache_file_name=str(workdir / "train-indices.arrow"),
                                    test_indices_cache_file_name=str(workdir / "val-indices.arrow"))
        self.parts = {"train": parts["train"], "val": parts["test"]}  # nanoGPT renames test to val
        self.total = len(ds)

    def documents(self) -> Iterator[Document]:
        for split, part in self.parts.items():
            yield from _dataset_documents(part, self.text_field, self.source, split)


# ---------------------------------------------------------------------------------------------
# Pieces: long texts are cut where every tiktoken pattern (gpt2, cl100k, o200k) has a token
# boundary anyway, so tokenizing the pieces one by one gives exactly the tokens of the whole.


def _safe_cut(text: str, limit: int) -> int:
    """A cut position in text[limit // 2 : limit] (needs len(text) > limit): after a lone newline
    between two non-space characters, else before a lone space between them, else at `limit`."""
    low = limit // 2
    for sep, after in (("\n", 1), (" ", 0)):
        pos = text.rfind(sep, low, limit)
        while pos > low:
            if not text[pos - 1].isspace() and not text[pos + 1].isspace():
                return pos + after
            pos = text.rfind(sep, low, pos)
    return limit  # a megabyte without a single safe spot: tokens may differ at this one cut


def pieces(chunks: Iterable[tuple[str, float]], size: int = 0) -> Iterator[tuple[str, float]]:
    """Re-cut (text, progress) chunks into pieces of at most about `size` characters at safe spots."""
    size = size or PIECE_CHARS
    buf, progress = "", 0.0
    for text, amount in chunks:
        buf, progress = buf + text if buf else text, progress + amount
        while len(buf) > size:
            cut = _safe_cut(buf, size)
            yield buf[:cut], progress
            buf, progress = buf[cut:], 0.0
    if buf or progress:
        yield buf, progress


# ---------------------------------------------------------------------------------------------
# Progress: a live rich bar on a terminal, a plain line every PROGRESS_SECONDS otherwise.


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


class Progress:
    def __init__(self, description: str, total: float | None, unit: str, quiet: bool = False):
        from nanogpt_cli.progress import console, is_interactive

        self.description, self.total, self.unit, self.console = description, total, unit, console
        self.done = self.tokens = 0.0
        self.start = self.last_line = time.time()
        self.quiet = quiet or console.quiet
        self.bar = None
        if not self.quiet and is_interactive():
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                    TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task(description, total=total, info="")
            self.bar.start()

    def _info(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        done = f"{_human(self.done)}B" if self.unit == "bytes" else f"{self.done:,.0f} docs"
        if self.total:
            done += f" / {_human(self.total)}B" if self.unit == "bytes" else f" / {self.total:,.0f}"
        rate = f"{_human(self.done / elapsed)}B/s" if self.unit == "bytes" else f"{self.done / elapsed:,.0f} docs/s"
        tokens = f", {_human(self.tokens)} tokens ({_human(self.tokens / elapsed)}/s)" if self.tokens else ""
        return f"{done}, {rate}{tokens}"

    def advance(self, amount: float, tokens: int = 0) -> None:
        self.done += amount
        self.tokens += tokens
        if self.quiet:
            return
        now = time.time()
        if self.bar is not None and now - self.last_line >= 0.1:  # called per document: redraw 10 times a second
            self.last_line = now
            self.bar.update(self.task, completed=self.done, info=self._info())
        elif self.bar is None and now - self.last_line >= PROGRESS_SECONDS:
            self.last_line = now
            eta = ""
            if self.total and self.done:
                eta = f", ETA {(self.total - self.done) * (now - self.start) / self.done:.0f}s"
            self.console.print(f"{self.description}: {self._info()}{eta}", markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=self._info())
            self.bar.stop()
            self.bar = None


# ---------------------------------------------------------------------------------------------
# The engine.


class Segment(NamedTuple):
    """A piece of text bound for one split; `starts`/`ends` mark the edges of a document."""

    text: str
    split: str
    starts: bool
    ends: bool
    progress: float


class _Scan(NamedTuple):
    chars: set
    n_chars: int
    documents: int


def _scan(corpus: Corpus, opts: PrepareOptions, collect_chars: bool) -> _Scan:
    """A first streaming pass: the character set (char vocabulary) and the character count."""
    chars: set = set()
    n_chars = documents = 0
    progress = Progress("collecting characters" if collect_chars else "counting characters", corpus.total,
                        corpus.unit, opts.quiet)
    try:
        for doc in corpus.documents():
            doc_chars = 0
            for text, amount in doc.chunks:
                if collect_chars:
                    chars.update(text)
                doc_chars += len(text)
                progress.advance(amount)
            n_chars += doc_chars
            documents += doc_chars > 0
    finally:
        progress.close()
    return _Scan(chars, n_chars, documents)


def _segments(corpus: Corpus, opts: PrepareOptions, split_at: int | None, counts: dict) -> Iterator[Segment]:
    """Documents as segments, each document assigned to a split.

    `split_at` (a single document): its first `split_at` characters train, the rest val, as nanoGPT
    does for Shakespeare. Otherwise each document after the first goes to val with probability
    `val_fraction`, drawn from a generator seeded with `seed` (the first always trains, so train is
    never empty)."""
    rng = random.Random(opts.seed)
    for doc in corpus.documents():
        split = doc.split or ("val" if counts["documents"] and rng.random() < opts.val_fraction else "train")
        seen = 0  # characters of this document so far
        started = {"train": False, "val": False}
        for text, amount in pieces(doc.chunks):
            parts = [(split, text)]
            if split_at is not None:  # cut the one document at character `split_at`
                cut = min(max(split_at - seen, 0), len(text))
                parts = [("train", text[:cut]), ("val", text[cut:])]
            seen += len(text)
            for part_split, part in parts:
                if part:
                    yield Segment(part, part_split, not started[part_split], False, 0.0)
                    started[part_split] = True
            yield Segment("", split, False, False, amount)
        if seen:
            last = "val" if split_at is not None else split
            counts["documents"] += 1
            counts[f"{last}_documents"] += 1
            yield Segment("", last, False, True, 0.0)


def _units(segments: Iterator[Segment], size: int = 0) -> Iterator[list[Segment]]:
    """Group consecutive segments into work units of about `size` characters."""
    size = size or UNIT_CHARS
    unit, chars = [], 0
    for seg in segments:
        unit.append(seg)
        chars += len(seg.text)
        if chars >= size or len(unit) >= 4096:
            yield unit
            unit, chars = [], 0
    if unit:
        yield unit


class _SplitFile:
    """An append-only token file for one split."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "wb", buffering=1 << 20)
        self.tokens = 0
        self.last_document_at = 0  # token offset where the latest document began

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(tokens.data)
        self.tokens += len(tokens)


def _make_encoder(tokenizer, dtype: str):
    """text -> np.ndarray of token ids; tiktoken releases the GIL, so threads run in parallel."""
    if isinstance(tokenizer, CharTokenizer):
        top = max(ord(c) for c in tokenizer.itos)
        table = np.zeros(top + 1, dtype=dtype)
        for i, ch in enumerate(tokenizer.itos):
            table[ord(ch)] = i

        def encode(text: str) -> np.ndarray:
            codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            if codepoints.size and codepoints.max() > top:
                raise NgptError("a source changed while it was being prepared; run the command again")
            return table[codepoints]

        return encode
    enc = tokenizer.enc

    def encode(text: str) -> np.ndarray:
        try:
            if hasattr(enc, "encode_to_numpy"):  # tiktoken >= 0.7: no Python list of ints in between
                # nothing allowed or disallowed: special-token text is plain text, as in encode_ordinary
                ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
                return ids.astype(dtype, copy=False)
            return np.asarray(enc.encode_ordinary(text), dtype=dtype)
        except UnicodeEncodeError:  # lone surrogates (JSON can escape them): replaced, as tiktoken does
            return encode(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    return encode


def _encode_and_write(units: Iterator[list[Segment]], encode, files: dict, eot: np.ndarray | None,
                      threads: int, progress: Progress) -> None:
    """Tokenize units on a thread pool, a bounded number in flight, and append them in order."""

    def work(unit):
        return [encode(seg.text) if seg.text else None for seg in unit]

    def write(unit, tokens):
        for seg, ids in zip(unit, tokens, strict=True):
            out = files[seg.split]
            if seg.starts:
                out.last_document_at = out.tokens
            n = 0
            if ids is not None:
                out.write(ids)
                n = len(ids)
            if seg.ends and eot is not None:
                out.write(eot)
                n += 1
            progress.advance(seg.progress, n)

    pool = ThreadPoolExecutor(threads)
    pending: deque = deque()
    try:
        for unit in units:
            pending.append((unit, pool.submit(work, unit)))
            if len(pending) > 2 * threads:  # bounded read-ahead keeps memory flat
                unit0, future = pending.popleft()
                write(unit0, future.result())
        while pending:
            unit0, future = pending.popleft()
            write(unit0, future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _move_tail(src: _SplitFile, dst: _SplitFile, start: int) -> None:
    """Move tokens [start:] of `src` to the end of `dst` (files closed), in bounded chunks."""
    itemsize = src.dtype.itemsize
    with open(src.path, "rb") as fin, open(dst.path, "ab") as fout:
        fin.seek(start * itemsize)
        while block := fin.read(16 << 20):
            fout.write(block)
    os.truncate(src.path, start * itemsize)
    moved = src.tokens - start
    src.tokens, dst.tokens = start, dst.tokens + moved


def _check_options(opts: PrepareOptions) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", opts.name or ""):
        raise UsageError(f"invalid dataset name {opts.name!r}: use letters, digits, '.', '_' and '-'")
    if not 0 < opts.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {opts.val_fraction}")
    if opts.errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be 'strict' or 'replace', got {opts.errors!r}")


def _fingerprint(recipe: str, corpus: Corpus, opts: PrepareOptions) -> str:
    key = {"format": FORMAT, "recipe": recipe, "sources": corpus.identity(), "tokenizer": opts.tokenizer,
           "val_fraction": opts.val_fraction, "seed": opts.seed, "errors": opts.errors,
           "append_eot": opts.append_eot}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a prepared dataset (no meta.json)") from None
    except (OSError, ValueError) as e:
        raise NgptError(f"{folder / 'meta.json'}: unreadable ({_one_line(e)})") from None


def _is_complete(folder: Path, meta: dict) -> bool:
    """The files meta.json lists exist with the sizes its token counts imply."""
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        return all((folder / s["file"]).stat().st_size == s["tokens"] * itemsize for s in meta["splits"].values())
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _summary(meta: dict, folder: Path, status: str) -> dict:
    splits = meta["splits"]
    return {"status": status, "name": meta["name"], "path": str(folder), "tokenizer": meta["tokenizer"],
            "vocab_size": meta["vocab_size"], "dtype": meta["dtype"], "documents": meta.get("documents"),
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
            "files": [str(folder / s["file"]) for s in splits.values()] + [str(folder / "meta.json")],
            "seconds": meta.get("seconds"), "source": meta.get("source")}


def _clean_stale(data_dir: Path, name: str) -> None:
    """Remove temporary folders that a killed run of this dataset left behind."""
    for tmp in data_dir.glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)  # still running: leave it alone
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished files into place; meta.json goes last, so a folder with a meta.json
    always holds the bins it describes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    for name in ("train.bin", "val.bin"):
        os.replace(tmp / name, out / name)
    os.replace(tmp / "meta.json", out / "meta.json")


def _prepare(recipe: str, corpus: Corpus, opts: PrepareOptions, split_by_chars: bool | None = None) -> dict:
    """Stream `corpus` into `<data_dir>/<name>/`; returns a summary (also when already up to date).

    Everything is written into a hidden sibling folder first and moved into place at the end, so
    an error, a Ctrl-C or a crash leaves the previous dataset as it was."""
    started = time.time()
    _check_options(opts)
    data_dir = resolve_data_dir(opts.data_dir)
    out = data_dir / opts.name
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    fingerprint = _fingerprint(recipe, corpus, opts)
    if not opts.force and (out / "meta.json").exists():
        try:
            meta = _read_meta(out)
        except NgptError:
            meta = {}
        if meta.get("fingerprint") == fingerprint and _is_complete(out, meta):
            return _summary(meta, out, "up to date")
    tokenizer = None if opts.tokenizer == "char" else get_tokenizer(opts.tokenizer)  # fail before reading

    data_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(data_dir, opts.name)
    tmp = data_dir / f".{opts.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if split_by_chars is None:
        split_by_chars = corpus.single_document
    try:
        meta = _build(corpus, opts, tokenizer, tmp, split_by_chars)
        meta.update(fingerprint=fingerprint, created=datetime.now(UTC).isoformat(timespec="seconds"),
                    seconds=round(time.time() - started, 2), recipe=recipe,
                    options={"val_fraction": opts.val_fraction, "seed": opts.seed, "errors": opts.errors,
                             "append_eot": opts.append_eot and tokenizer is not None})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _commit(tmp, out)
    finally:  # success, error, Ctrl-C: the temporary folder goes
        shutil.rmtree(tmp, ignore_errors=True)
    return _summary(meta, out, "prepared")


def _build(corpus: Corpus, opts: PrepareOptions, tokenizer, tmp: Path, split_by_chars: bool) -> dict:
    """Read, tokenize and write train.bin / val.bin into `tmp`; returns the meta.json fields."""
    char = tokenizer is None
    corpus.load(tmp)
    split_at = None
    if char or split_by_chars:
        scan = _scan(corpus, opts, collect_chars=char)
        if not scan.documents:
            raise NgptError(f"no text in {corpus.source} (empty corpus)")
        if char:
            tokenizer = CharTokenizer(sorted(scan.chars))
        if split_by_chars:
            if scan.n_chars < 2:
                raise NgptError(f"{corpus.source}: too little text to split into train and val")
            split_at = max(int(scan.n_chars * (1 - opts.val_fraction)), 1)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    eot = None
    if not char and opts.append_eot and tokenizer.eot_token is not None:
        eot = np.array([tokenizer.eot_token], dtype=dtype)

    files = {s: _SplitFile(tmp / f"{s}.bin", dtype) for s in ("train", "val")}
    counts = {"documents": 0, "train_documents": 0, "val_documents": 0}
    progress = Progress("tokenizing", corpus.total, corpus.unit, opts.quiet)
    try:
        segments = _segments(corpus, opts, split_at, counts)
        _encode_and_write(_units(segments), _make_encoder(tokenizer, dtype), files, eot,
                          opts.num_threads or os.cpu_count() or 1, progress)
    finally:
        progress.close()
        for f in files.values():
            f.file.close()
    train, val = files["train"], files["val"]
    if not counts["documents"]:
        raise NgptError(f"no text in {corpus.source} (empty corpus)")
    if not val.tokens:  # val must not be empty: hold out the last document, or the end of the only one
        if counts["documents"] > 1:
            _move_tail(train, val, train.last_document_at)
        elif train.tokens < 2:
            raise NgptError(f"{corpus.source}: too little text to split into train and val")
        else:
            _move_tail(train, val, max(int(train.tokens * (1 - opts.val_fraction)), 1))
    return {"format": FORMAT, "name": opts.name, **tokenizer.meta(), "dtype": dtype,
            "eot_token": None if char else tokenizer.eot_token,
            "splits": {s: {"file": f"{s}.bin", "tokens": f.tokens} for s, f in files.items()},
            "documents": counts["documents"], "source": corpus.source}


# ---------------------------------------------------------------------------------------------
# Recipes.


def _fetch(source: str | None, default_url: str = SHAKESPEARE_URL) -> Path:
    """A local file for `source` (a path or a URL; None means the default URL), downloading into
    the cache on first use."""
    source = source or default_url
    if not re.match(r"https?://", source):
        path = Path(source).expanduser()
        if path.is_dir():
            raise UsageError(f"--source {source} is a folder; it needs a text file")
        if not path.exists():
            raise UsageError(f"no such file: {source}")
        return path
    if source == SHAKESPEARE_URL:
        target = cache_dir() / "tinyshakespeare" / "input.txt"
    else:
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        target = cache_dir() / "downloads" / f"{digest}-{Path(source.split('?')[0]).name or 'download'}"
    if target.exists():
        return target
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(source, timeout=30) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(partial, target)
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise NgptError(f"could not download {source} ({_one_line(getattr(e, 'reason', e))}); "
                        "without network, download it elsewhere and pass --source PATH") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def _with(opts: PrepareOptions | None, **defaults) -> PrepareOptions:
    opts = PrepareOptions(**asdict(opts)) if opts else PrepareOptions()
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    return opts


def prepare_shakespeare_char(opts: PrepareOptions | None = None, source: str | None = None) -> dict:
    """nanoGPT's shakespeare_char: tiny Shakespeare, one token per character, first 90% train."""
    opts = _with(opts, name="shakespeare_char", val_fraction=0.1)
    opts.tokenizer, opts.append_eot = "char", False
    corpus = FileCorpus([_fetch(source)], errors=opts.errors)
    corpus.source = source or SHAKESPEARE_URL
    return _prepare("shakespeare", corpus, opts, split_by_chars=True)


def prepare_shakespeare(opts: PrepareOptions | None = None, source: str | None = None) -> dict:
    """nanoGPT's shakespeare: tiny Shakespeare in GPT-2 BPE, split 90/10 by characters, no EOT."""
    opts = _with(opts, name="shakespeare", val_fraction=0.1)
    opts.append_eot = False
    corpus = FileCorpus([_fetch(source)], errors=opts.errors)
    corpus.source = source or SHAKESPEARE_URL
    return _prepare("shakespeare", corpus, opts, split_by_chars=True)


def prepare_openwebtext(opts: PrepareOptions | None = None, dataset_id: str = OPENWEBTEXT_ID,
                        revision: str | None = OPENWEBTEXT_REVISION, data_files: list[str] | None = None,
                        num_proc: int | None = None, text_field: str = "text") -> dict:
    """nanoGPT's openwebtext: `train_test_split(test_size=0.0005, seed=2357, shuffle=True)`, test
    renamed val, GPT-2 BPE with EOT after every document."""
    opts = _with(opts, name="openwebtext", val_fraction=0.0005)
    if num_proc and not opts.num_threads:
        opts.num_threads = num_proc
    _check_options(opts)
    corpus = OpenWebTextCorpus(dataset_id, revision, data_files, num_proc, opts.val_fraction, opts.seed, text_field)
    return _prepare("openwebtext", corpus, opts, split_by_chars=False)


def default_name(source: str) -> str:
    """A dataset name from a path, glob or Hub id: its last plain component."""
    parts = [p for p in re.split(r"[/\\]", source.rstrip("/\\")) if p and not _looks_like_glob(p)]
    stem = Path(parts[-1]).stem if parts else "text"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "text"


def prepare_text(paths: list[str], opts: PrepareOptions | None = None, text_field: str = "text") -> dict:
    """Local .txt / .jsonl / .parquet files, folders and globs."""
    opts = _with(opts, name=default_name(str(paths[0])) if paths else "text", val_fraction=0.1)
    corpus = FileCorpus(paths, text_field, opts.errors)
    return _prepare("text", corpus, opts)


def prepare_hf(name_or_path: str, opts: PrepareOptions | None = None, config: str | None = None,
               split: str = "train", text_field: str = "text", revision: str | None = None) -> dict:
    """Any Hugging Face dataset (Hub id, saved folder, folder of data files)."""
    name = default_name(name_or_path) + (f"-{config}" if config else "")
    opts = _with(opts, name=default_name(name), val_fraction=0.1)
    corpus = HFCorpus(name_or_path, config, split, text_field, revision)
    return _prepare("hf", corpus, opts, split_by_chars=False)


# ---------------------------------------------------------------------------------------------
# Reading back, for `ngpt data`.


def _size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def list_datasets(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The prepared datasets under the data dir: one row each."""
    root = resolve_data_dir(data_dir)
    rows = []
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / "meta.json").exists():
            continue
        try:
            meta = _read_meta(folder)
            splits = {s: v["tokens"] for s, v in meta["splits"].items()}
        except (NgptError, KeyError, TypeError, AttributeError):
            rows.append({"name": folder.name, "path": str(folder), "error": "unreadable meta.json"})
            continue
        rows.append({"name": folder.name, "path": str(folder), "tokenizer": meta.get("tokenizer"),
                     "vocab_size": meta.get("vocab_size"), "dtype": meta.get("dtype"), "tokens": splits,
                     "documents": meta.get("documents"), "bytes": _size_on_disk(folder),
                     "source": meta.get("source"), "created": meta.get("created")})
    return rows


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """Everything meta.json says about one dataset (a name under the data dir, or a folder path),
    plus where it is and how much disk it takes."""
    root = resolve_data_dir(data_dir)
    folder = root / name
    if not (folder / "meta.json").exists() and Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    if not (folder / "meta.json").exists():
        known = ", ".join(row["name"] for row in list_datasets(root)) or "none yet"
        raise UsageError(f"no dataset {name!r} in {root} (datasets: {known}); see `ngpt prepare --help`")
    meta = _read_meta(folder)
    return {**meta, "path": str(folder), "bytes": _size_on_disk(folder), "complete": _is_complete(folder, meta)}
