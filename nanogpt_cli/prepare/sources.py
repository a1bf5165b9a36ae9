"""Where prepared text comes from: corpora (local files, Hugging Face datasets, openwebtext) as
streams of documents, the readers behind them, and the download of a source file into the cache.

A corpus is a stream of documents; a document is a stream of (text, progress) chunks. Reading is
incremental: a text file a MiB at a time, JSONL a line at a time, parquet and datasets in batches.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from nanogpt_cli.atomic import check_regular, download, open_regular
from nanogpt_cli.config import cache_dir
from nanogpt_cli.errors import NgptError, UsageError, one_line
from nanogpt_cli.hub import hub_error, offline_unless_reachable, quiet_hub_logs

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TEXT_SUFFIXES = {".txt", ".text", ".md"}
FILE_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
READ_BYTES = 1 << 20  # large files are read a MiB at a time (the writer re-cuts them into pieces)


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


def read_text_chunks(path: Path, errors: str = "strict", chunk_bytes: int = 0) -> Iterator[tuple[str, int]]:
    """Decode a UTF-8 file a chunk at a time, yielding (text, bytes consumed); a character split
    across two chunks is carried over, and a bad byte is reported with its offset in the file."""
    pending, offset = b"", 0
    with open_regular(path) as f:
        while True:
            raw = f.read(chunk_bytes or READ_BYTES)
            data = pending + raw
            try:
                text, consumed = codecs.utf_8_decode(data, errors, not raw)
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}: invalid UTF-8 at byte {offset + e.start} ({e.reason}); "
                                 "pass --errors replace to replace bad bytes and go on") from None
            pending, offset = data[consumed:], offset + consumed
            if text or not raw:
                yield text, consumed
            if not raw:
                return


def _jsonl_documents(path: Path, text_field: str, errors: str) -> Iterator[Document]:
    offset = 0
    with open_regular(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise UsageError(f"{path}:{lineno}: invalid UTF-8 at byte {offset + e.start} ({e.reason}); "
                                 "pass --errors replace to replace bad bytes and go on") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UsageError(f"{path}:{lineno}: no {text_field!r} field (found: {fields}); "
                                 "choose the field with --text-field")
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise UsageError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not text")
            yield Document([(text or "", len(raw))])


def _parquet_documents(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_regular(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise UsageError(f"{path}: not a readable parquet file ({one_line(e)})") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise UsageError(f"{path}: no {text_field!r} column (found: {', '.join(names)}); "
                             "choose the column with --text-field")
        rows = max(pf.metadata.num_rows, 1)
        per_row = os.fstat(f.fileno()).st_size / rows  # progress is in bytes: share the file size among the rows
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise UsageError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
                yield Document([(text or "", per_row)])


def _absolute(arg: str) -> str:
    """A path or glob as given, made absolute (for meta.json's source)."""
    return os.path.abspath(os.path.expanduser(arg))


def _looks_like_glob(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def _hidden(parts: Iterable[str]) -> bool:
    return any(part.startswith(".") for part in parts)


def _glob(arg: str) -> list[Path]:
    """The files a glob matches, `**` spanning folders. Symlinked folders are not entered on the way
    down (a link back up would make the walk endless), and hidden entries are skipped unless the
    pattern names them, as with shell globs."""
    parts = Path(os.path.expanduser(arg)).parts
    first = next(i for i, part in enumerate(parts) if _looks_like_glob(part))
    root = Path(*parts[:first]) if first else Path(".")
    pattern = parts[first:]
    return [p for p in root.glob("/".join(pattern)) if _hidden(pattern) or not _hidden(p.relative_to(root).parts)]


def _wanted(path: Path) -> bool:
    """A regular file (through symlinks) of a supported type: FIFOs and devices found in a walk are skipped."""
    return path.is_file() and path.suffix.lower() in FILE_SUFFIXES


def resolve_paths(args: Iterable[str]) -> list[Path]:
    """Files from paths, folders (recursive; hidden entries and symlinked folders skipped) and glob
    patterns, in a stable order. A named file that is not a regular file (a FIFO, a device, a socket)
    is refused: it would block or never end."""
    files: list[Path] = []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            # rglob does not enter symlinked folders, so a symlink cycle cannot make the walk endless
            found = sorted(p for p in path.rglob("*") if _wanted(p) and not _hidden(p.relative_to(path).parts))
            if not found:
                raise UsageError(f"no .txt, .jsonl or .parquet files in folder {arg}")
            files += found
        elif path.exists():
            if path.suffix.lower() not in FILE_SUFFIXES:
                raise UsageError(f"{arg}: unsupported file type {path.suffix or '(none)'!r}; "
                                 "use .txt (or .md), .jsonl or .parquet files")
            check_regular(path, arg)
            files.append(path)
        elif _looks_like_glob(arg):
            found = sorted(p for p in _glob(arg) if _wanted(p))
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
        raise UsageError(f"{where} has no {text_field!r} column (found: {', '.join(names)}); "
                         "choose the column with --text-field")
    try:
        with quiet_hub_logs():
            for batch in ds.select_columns([text_field]).iter(batch_size=1000):
                for text in batch[text_field]:
                    if text is not None and not isinstance(text, str):
                        raise UsageError(f"{where}: column {text_field!r} holds {type(text).__name__}, not text")
                    yield Document([(text or "", 1)], split)
    except (NgptError, KeyboardInterrupt):
        raise
    except KeyError:
        raise UsageError(f"{where} has no {text_field!r} column; choose the column with --text-field") from None
    except Exception as e:  # network and format errors surface while streaming
        raise NgptError(f"could not read {where}: {one_line(e)}") from None


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _folder_identity(path: Path) -> list:
    return [_stat(p) for p in sorted(path.rglob("*")) if p.is_file()]


LOCAL_HINT = "pass a local folder (saved with save_to_disk, or of .parquet/.jsonl files) instead"


def _load_error(name: str, e: Exception, local: bool, hint: str = LOCAL_HINT) -> NgptError:
    """A dataset that `datasets` could not open: from the Hub (unreachable, or it said no), or a local folder."""
    if local:
        return NgptError(f"could not load {name} ({type(e).__name__}: {one_line(e, 300)})")
    return hub_error(name, e, hint)


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

    @quiet_hub_logs()
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
                with offline_unless_reachable(uses_hub=not self.local):
                    ds = datasets.load_dataset(str(self.path) if self.local else self.name, self.config,
                                               split=self.split, revision=self.revision, streaming=True)
        except NgptError:
            raise
        except Exception as e:
            raise _load_error(self.name, e, self.local) from None
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

    @quiet_hub_logs()
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
                with offline_unless_reachable(uses_hub=not self.path.is_dir()):
                    ds = datasets.load_dataset(str(self.path) if self.path.is_dir() else self.dataset_id,
                                               split="train", revision=self.revision, num_proc=self.num_proc)
        except Exception as e:
            raise _load_error(self.dataset_id, e, bool(self.files) or self.path.is_dir(),
                              "pass --dataset-id FOLDER (saved with save_to_disk, or of data files) or --data-files "
                              "FILES instead") from None
        if len(ds) < 2:
            raise UsageError(f"{self.source}: {len(ds)} document(s); need at least 2 to split into train and val")
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
# Downloads, for the Shakespeare recipes.


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
        check_regular(path, f"--source {source}")
        return path
    if source == SHAKESPEARE_URL:
        target = cache_dir() / "tinyshakespeare" / "input.txt"
    else:
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        name = Path(source.split("?")[0]).name or "download"
        suffix = "" if Path(name).suffix.lower() in TEXT_SUFFIXES else ".txt"  # read as text, whatever the URL says
        target = cache_dir() / "downloads" / f"{digest}-{name}{suffix}"
    if not target.exists():
        download(source, target, "--source")
    return target
