"""The prepare engine: stream a corpus's documents in pieces, tokenize them on a thread pool, append
the tokens to train.bin / val.bin in a temporary folder, and move the finished files into place
(meta.json last), so an error, a Ctrl-C or a crash leaves the previous dataset as it was.

`_prepare` is the entry point for the recipes; it also checks whether the same sources and
options were prepared already (the fingerprint), refuses to replace a dataset made from other
sources unless forced, and locks the dataset against a second writer; `_read_meta` /
`_is_complete` read back what it wrote. A training run reading the dataset is not disturbed by a
re-prepare: the new files are renamed over the old names, and the run's loader keeps the old files
open (data.BatchLoader), so it reads the data it started with.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nanogpt_cli.atomic import (
    LOCK_NAME,
    exclusive_lock,
    file_in_folder,
    fsync_folder,
    new_file,
    open_regular,
    remove_stale_temps,
    signals_deferred,
    temp_folder,
)
from nanogpt_cli.config import resolve_data_dir
from nanogpt_cli.errors import NgptError, UsageError, one_line
from nanogpt_cli.prepare.bpe import parse_bpe_spec, read_tokenizer_file, train_bpe
from nanogpt_cli.prepare.progress import Progress
from nanogpt_cli.prepare.sources import Corpus
from nanogpt_cli.tokenizer import TOKENIZER_FILE, BPETokenizer, CharTokenizer, get_tokenizer

FORMAT = 1
SPLIT_FILES = ("train.bin", "val.bin")
PIECE_CHARS = 1 << 20  # text is tokenized in pieces of about a million characters
UNIT_CHARS = 1 << 20  # small documents are grouped into work units of about this size for the threads
TRAIN_PIECE_CHARS = 1 << 16  # the BPE trainer holds 256 texts in its buffer: small pieces keep that small


@dataclass
class PrepareOptions:
    """What every `ngpt prepare` command shares."""

    name: str | None = None  # output folder under the data dir; each recipe has its default
    data_dir: str | os.PathLike | None = None  # None: $NGPT_DATA_DIR, else the per-user data folder
    tokenizer: str = "gpt2"  # "char", "gpt2", any tiktoken encoding name, "bpe:N" (an N-token byte-level BPE
    # trained on the train split) or a tokenizer.json to reuse (a path, or a dataset folder holding one)
    tokenizer_sample: int = 0  # bpe:N trains on the first this many bytes of the train split; 0: all of it
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
        self.file = new_file(path, buffering=1 << 20)
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
        except UnicodeEncodeError:
            return encode(_replace_lone_surrogates(text))

    return encode


def _replace_lone_surrogates(text: str) -> str:
    """Lone surrogates (JSON can escape them) have no UTF-8: replaced by U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _train_tokenizer(corpus: Corpus, opts: PrepareOptions, split_at: int | None, vocab_size: int) -> BPETokenizer:
    """bpe:N: a byte-level BPE trained on the text of the train split (val stays unseen, so its bits per byte
    are not flattered), or on its first `tokenizer_sample` bytes, read as a stream in pieces."""
    limit = opts.tokenizer_sample
    progress = Progress("training the tokenizer", None if limit else corpus.total, corpus.unit, opts.quiet)
    taken = 0

    def train_text() -> Iterator[str]:
        nonlocal taken
        for seg in _segments(corpus, opts, split_at, {"documents": 0, "train_documents": 0, "val_documents": 0}):
            progress.advance(seg.progress)
            if seg.split != "train" or not seg.text:
                continue
            try:
                data = seg.text.encode("utf-8")
                text = seg.text
            except UnicodeEncodeError:
                text = _replace_lone_surrogates(seg.text)
                data = text.encode("utf-8")
            if limit and taken + len(data) >= limit:  # the sample ends inside this piece, at a character
                text = data[:limit - taken].decode("utf-8", "ignore")
            taken += len(data)
            for piece, _ in pieces([(text, 0.0)], TRAIN_PIECE_CHARS):  # cut per segment: never across documents
                yield piece
            if limit and taken >= limit:
                return

    sample = f" (at most the first {limit:,} bytes of its train split, --tokenizer-sample)" if limit else ""
    try:
        return train_bpe(train_text(), vocab_size, f"{corpus.source}{sample}")
    finally:
        progress.close()


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
    if opts.tokenizer_sample and parse_bpe_spec(opts.tokenizer) is None:
        raise UsageError(f"--tokenizer-sample is the training text of --tokenizer bpe:N, not of {opts.tokenizer}")
    if opts.tokenizer_sample < 0:
        raise UsageError(f"--tokenizer-sample must be a positive size, got {opts.tokenizer_sample}")


def _names_a_file(spec: str) -> bool:
    """--tokenizer FILE: a .json, or a path (a dataset folder); never a bare word like gpt2, which may also
    be the name of a folder in the current one."""
    return spec.endswith(".json") or any(sep in spec for sep in "/\\")


def _open_tokenizer(spec: str):
    """The tokenizer --tokenizer names, loaded before any reading; None for those built from the corpus
    (char, bpe:N)."""
    if spec == "char" or parse_bpe_spec(spec) is not None:
        return None
    if _names_a_file(spec):
        return read_tokenizer_file(spec)
    return get_tokenizer(spec)


def _fingerprint(recipe: str, corpus: Corpus, opts: PrepareOptions) -> str:
    key = {"format": FORMAT, "recipe": recipe, "sources": corpus.identity(), "tokenizer": opts.tokenizer,
           "val_fraction": opts.val_fraction, "seed": opts.seed, "errors": opts.errors,
           "append_eot": opts.append_eot}
    if parse_bpe_spec(opts.tokenizer) is not None:
        key["tokenizer_sample"] = opts.tokenizer_sample
    elif _names_a_file(opts.tokenizer):  # the file's content, not its name: an edited file prepares again
        file = Path(opts.tokenizer).expanduser()
        file = file / TOKENIZER_FILE if file.is_dir() else file
        key["tokenizer"] = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else str(file)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_meta(folder: Path) -> dict:
    meta_file = folder / "meta.json"
    if not os.path.lexists(meta_file):
        raise UsageError(f"{folder} is not a prepared dataset (no meta.json)")
    try:
        with open_regular(meta_file) as f:
            return json.loads(f.read().decode("utf-8"))
    except (NgptError, OSError, ValueError) as e:
        raise NgptError(f"{meta_file}: unreadable ({one_line(e)})") from None


def _is_complete(folder: Path, meta: dict) -> bool:
    """The files meta.json lists are regular files inside the folder, with the sizes its token counts imply."""
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        return all(file_in_folder(folder, s["file"], "meta.json").stat().st_size == s["tokens"] * itemsize
                   for s in meta["splits"].values())
    except (NgptError, OSError, KeyError, TypeError, ValueError, AttributeError):
        return False


def _summary(meta: dict, folder: Path, status: str) -> dict:
    splits = meta["splits"]
    return {"status": status, "name": meta["name"], "path": str(folder), "tokenizer": meta["tokenizer"],
            "vocab_size": meta["vocab_size"], "dtype": meta["dtype"], "documents": meta.get("documents"),
            "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
            "files": [str(folder / name) for name in [*(s["file"] for s in splits.values()),
                                                      *([meta["tokenizer_file"]] if "tokenizer_file" in meta else []),
                                                      "meta.json"]],
            "seconds": meta.get("seconds"), "source": meta.get("source")}


def _commit(tmp: Path, out: Path) -> None:
    """Rename the finished files over the old ones: the bins, then meta.json last (the old one is never
    deleted first), with Ctrl-C and SIGTERM held off between the renames. A reader with the old files
    open goes on reading them."""
    for name in (*SPLIT_FILES, "meta.json"):
        if (out / name).is_dir() and not (out / name).is_symlink():
            raise UsageError(f"{out / name} is a folder; move it away and prepare again")
    with signals_deferred():
        for name in SPLIT_FILES:
            os.replace(tmp / name, out / name)
        if (tmp / TOKENIZER_FILE).exists():
            os.replace(tmp / TOKENIZER_FILE, out / TOKENIZER_FILE)
        else:  # the folder was a trained-BPE dataset before: its tokenizer no longer describes it
            (out / TOKENIZER_FILE).unlink(missing_ok=True)
        os.replace(tmp / "meta.json", out / "meta.json")
    fsync_folder(out)


def _visible_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _check_replacing(out: Path, meta: dict | None, corpus: Corpus, opts: PrepareOptions) -> None:
    """Refuse (unless --force) to replace what is at `out` with a dataset from other sources: a dataset
    prepared from other files, one whose meta.json cannot be read, or a folder that is no dataset."""
    other_name = "--name NAME to prepare a dataset of another name"
    how = f"pass --force to replace it, or {other_name}"
    if meta is None and (out / "meta.json").exists():
        raise UsageError(f"{out / 'meta.json'} is unreadable, so what dataset {opts.name!r} holds is unknown; {how}")
    if meta is None:
        entries = _visible_entries(out) if out.is_dir() else []
        if entries:
            raise UsageError(f"{out} holds files ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}) "
                             f"but no dataset; pass --force to write the dataset among them, or {other_name}")
    elif meta.get("source") != corpus.source:
        raise UsageError(f"dataset {opts.name!r} in {out.parent} was prepared from {meta.get('source') or 'elsewhere'}"
                         f", not from {corpus.source}; {how}")


@contextlib.contextmanager
def _writing(out: Path, name: str):
    """The dataset folder, created if need be and locked against a second writer while the block runs;
    a folder this prepare created is removed again if it fails."""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        with exclusive_lock(out / LOCK_NAME, f"dataset {name!r}",
                            "wait for it to finish, or prepare under another --name"):
            yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _prepare(recipe: str, corpus: Corpus, opts: PrepareOptions, split_by_chars: bool | None = None) -> dict:
    """Stream `corpus` into `<data_dir>/<name>/`; returns a summary (also when already up to date).

    Everything is written into a hidden temporary folder inside the dataset folder first and renamed
    into place at the end, so an error, a Ctrl-C or a crash leaves the previous dataset as it was."""
    started = time.time()
    _check_options(opts)
    data_dir = resolve_data_dir(opts.data_dir)
    out = data_dir / opts.name
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    fingerprint = _fingerprint(recipe, corpus, opts)
    meta = None
    if (out / "meta.json").exists():
        with contextlib.suppress(NgptError):
            meta = _read_meta(out)
    if not opts.force:
        if meta is not None and meta.get("fingerprint") == fingerprint and _is_complete(out, meta):
            return _summary(meta, out, "up to date")
        _check_replacing(out, meta, corpus, opts)
    tokenizer = _open_tokenizer(opts.tokenizer)  # fail before reading

    if split_by_chars is None:
        split_by_chars = corpus.single_document
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # what killed prepares left beside the folder (earlier versions built there)
    with _writing(out, opts.name):
        build = out / "build"
        remove_stale_temps(build)  # the temporary folders of killed runs
        tmp = temp_folder(build)
        try:
            meta = _build(corpus, opts, tokenizer, tmp, split_by_chars)
            meta.update(fingerprint=fingerprint, created=datetime.now(UTC).isoformat(timespec="seconds"),
                        seconds=round(time.time() - started, 2), recipe=recipe,
                        options={"val_fraction": opts.val_fraction, "seed": opts.seed, "errors": opts.errors,
                                 "append_eot": opts.append_eot and opts.tokenizer != "char"})
            with new_file(tmp / "meta.json") as f:
                f.write((json.dumps(meta, indent=1) + "\n").encode("utf-8"))
            _commit(tmp, out)
        except OSError as e:  # the disk (full, read-only, failing): name the path
            where = f"{e.filename}: " if e.filename else ""
            raise NgptError(f"could not prepare the dataset {out}: {where}{e.strerror or one_line(e)}; "
                            "nothing was changed") from None
        finally:  # success, error, Ctrl-C: the temporary folder goes
            shutil.rmtree(tmp, ignore_errors=True)
    return _summary(meta, out, "prepared")


def _build(corpus: Corpus, opts: PrepareOptions, tokenizer, tmp: Path, split_by_chars: bool) -> dict:
    """Read, tokenize and write train.bin / val.bin (and a BPE's tokenizer.json) into `tmp`; returns the
    meta.json fields."""
    char = opts.tokenizer == "char"
    bpe_size = parse_bpe_spec(opts.tokenizer)
    corpus.load(tmp)
    split_at = None
    if char or split_by_chars:
        scan = _scan(corpus, opts, collect_chars=char)
        if not scan.documents:
            raise UsageError(f"no text in {corpus.source} (empty corpus)")
        if char:
            tokenizer = CharTokenizer(sorted(scan.chars))
        if split_by_chars:
            if scan.n_chars < 2:
                raise UsageError(f"{corpus.source}: too little text to split into train and val")
            split_at = max(int(scan.n_chars * (1 - opts.val_fraction)), 1)
    if bpe_size is not None:
        tokenizer = _train_tokenizer(corpus, opts, split_at, bpe_size)
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
        raise UsageError(f"no text in {corpus.source} (empty corpus)")
    if not val.tokens:  # val must not be empty: hold out the last document, or the end of the only one
        if counts["documents"] > 1:
            _move_tail(train, val, train.last_document_at)
        elif train.tokens < 2:
            raise UsageError(f"{corpus.source}: too little text to split into train and val")
        else:
            _move_tail(train, val, max(int(train.tokens * (1 - opts.val_fraction)), 1))
    tokenizer_meta = tokenizer.meta()
    if isinstance(tokenizer, BPETokenizer):  # the file, named and fingerprinted in meta.json (as bytes: no \r\n)
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer_meta.pop("tokenizer_json").encode("utf-8"))
    return {"format": FORMAT, "name": opts.name, **tokenizer_meta, "dtype": dtype,
            "eot_token": None if char else tokenizer.eot_token,
            "splits": {s: {"file": f"{s}.bin", "tokens": f.tokens} for s, f in files.items()},
            "documents": counts["documents"], "source": corpus.source}
