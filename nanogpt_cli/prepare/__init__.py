"""Turn text into training tokens (train.bin, val.bin, meta.json), streaming, in bounded memory.

The plain functions behind `ngpt prepare ...`: `prepare_shakespeare_char`, `prepare_shakespeare`,
`prepare_openwebtext`, `prepare_text` and `prepare_hf` each describe a corpus (`sources`) and hand
it to one engine, `writer._prepare`, which streams documents in pieces (first through a BPE trainer,
`bpe`, for `--tokenizer bpe:N`), tokenizes them on a thread pool, appends the tokens to files in a
temporary folder and moves them into place when complete (meta.json last). `list_datasets` and
`dataset_info` read what was written, for `ngpt data`.

The tunables (READ_BYTES in `sources`; PIECE_CHARS and UNIT_CHARS in `writer`) live, and are
patched, in the module that reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path

from nanogpt_cli.config import resolve_data_dir
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.hub import OPENWEBTEXT_ID, OPENWEBTEXT_REVISION
from nanogpt_cli.prepare.bpe import parse_byte_size
from nanogpt_cli.prepare.sources import (
    SHAKESPEARE_URL,
    Corpus,
    Document,
    FileCorpus,
    HFCorpus,
    OpenWebTextCorpus,
    _fetch,
    _looks_like_glob,
    read_text_chunks,
    resolve_paths,
)
from nanogpt_cli.prepare.writer import (
    FORMAT,
    PrepareOptions,
    Segment,
    _check_options,
    _is_complete,
    _prepare,
    _read_meta,
    dtype_for_vocab,
    pieces,
)

__all__ = [
    "FORMAT", "OPENWEBTEXT_ID", "OPENWEBTEXT_REVISION", "SHAKESPEARE_URL", "Corpus", "Document", "FileCorpus",
    "HFCorpus", "OpenWebTextCorpus", "PrepareOptions", "Segment", "dataset_info", "default_name",
    "dtype_for_vocab", "list_datasets", "parse_byte_size", "pieces", "prepare_hf", "prepare_openwebtext",
    "prepare_shakespeare", "prepare_shakespeare_char", "prepare_text", "read_text_chunks", "resolve_paths",
]


# ---------------------------------------------------------------------------------------------
# Recipes.


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
