"""The memmap batch loader over a prepared dataset (train.bin / val.bin + meta.json).

`ngpt prepare` (the prepare package) writes the datasets; this module reads them: random windows of
block_size + 1 tokens, different per rank, reproducible from a seed, with a state that a
checkpoint stores so a resumed run draws exactly the batches it would have drawn.

A training run's stream continues torch's global generator from where the model's initialisation
left it (`generator_state`), and its evaluations draw from the same stream, as nanoGPT's `get_batch`
does: with the same seed (and no dropout, whose masks nanoGPT draws from that stream too) a run
trains on nanoGPT's batches and evaluates on nanoGPT's, so it reproduces nanoGPT's losses
(tests/test_train.py checks this). Standalone (`ngpt eval`) a loader is seeded from `seed`.

Under several processes all ranks share one stream of micro-batches (rank 0's) and rank r keeps
the micro-batches r, r + W, r + 2W, ... of it (W = world size). So a step of W processes with
accumulation A/W trains on exactly the micro-batches one process with accumulation A would, and
the loader's state is the same on every rank and independent of W.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from pathlib import Path

import numpy as np
import torch

from nanogpt_cli.atomic import file_in_folder
from nanogpt_cli.config import resolve_data_dir
from nanogpt_cli.errors import NgptError, UsageError

SPLITS = ("train", "val")


def dataset_path(dataset: str, data_dir: str | None = None) -> Path:
    """The folder of a prepared dataset: a path to such a folder, or a name under the data folder, spelt with
    dashes or underscores alike (`ngpt prepare shakespeare-char` makes `shakespeare_char`)."""
    as_path = Path(dataset).expanduser()
    if (as_path / "meta.json").is_file():
        return as_path
    root = resolve_data_dir(data_dir)
    for name in (dataset, dataset.replace("-", "_"), dataset.replace("_", "-")):
        if (root / name / "meta.json").is_file():
            return root / name
    return root / dataset


RECIPES = {"shakespeare_char": "shakespeare-char", "shakespeare": "shakespeare", "openwebtext": "openwebtext"}


def load_meta(folder: Path) -> dict:
    """meta.json of a prepared dataset, or a clear error saying which `ngpt prepare` to run."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        import difflib

        name = folder.name.replace("-", "_")
        prepared = sorted(meta.parent.name for meta in folder.parent.glob("*/meta.json"))
        close = difflib.get_close_matches(folder.name, prepared, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean --dataset={close[0]}? (prepared in {folder.parent}: {', '.join(prepared)})"
        elif name in RECIPES:
            hint = f"run `ngpt prepare {RECIPES[name]}` (it makes {name!r}), or set --data_dir"
        else:
            hint = f"run `ngpt prepare text FILES --name {folder.name}`, or set --data_dir"
        raise UsageError(f"dataset {folder.name!r} is not prepared in {folder.parent}: {hint}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NgptError(f"{meta_file} is corrupt ({e}); prepare the dataset again with --force") from None
    if "vocab_size" not in meta:
        raise NgptError(f"{meta_file} has no vocab_size; prepare the dataset again with --force")
    if meta.get("tokenizer") == "bpe":
        meta["tokenizer_json"] = read_tokenizer_json(folder, meta)
    return meta


def read_tokenizer_json(folder: Path, meta: dict) -> str:
    """The text of a trained-BPE dataset's tokenizer.json, checked against the sha256 meta.json names: the
    tokens in the bins are that tokenizer's (checkpoints then carry the text itself)."""
    path = folder / meta.get("tokenizer_file", "tokenizer.json")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NgptError(f"{path} is missing ({e.strerror}); prepare the dataset again with --force") from None
    if hashlib.sha256(data).hexdigest() != meta.get("tokenizer_sha256"):
        raise NgptError(f"{path} changed since the dataset was prepared (its sha256 is not the one meta.json "
                        "names), so it no longer describes the tokens; prepare the dataset again with --force")
    return data.decode("utf-8")


def check_vocabulary(data_meta: dict, model_meta: dict, model_vocab_size: int, dataset: str) -> None:
    """Refuse a dataset whose tokens the model cannot read: another tokenizer, other characters, or ids past
    the model's vocabulary (a usage error: the command named both)."""
    data_tok, model_tok = data_meta.get("tokenizer"), model_meta.get("tokenizer")
    if data_tok != model_tok:
        raise UsageError(f"the dataset {dataset!r} uses the {data_tok!r} tokenizer but the model was trained with "
                        f"{model_tok!r}; prepare the data with the model's tokenizer")
    if data_tok == "char" and data_meta.get("itos") != model_meta.get("itos"):
        raise UsageError(f"the dataset {dataset!r} has a different character vocabulary from the model's; prepare "
                        "it with the same characters, or train a new model")
    if data_tok == "bpe" and data_meta.get("tokenizer_sha256") != model_meta.get("tokenizer_sha256"):
        raise UsageError(f"the dataset {dataset!r} has another BPE tokenizer (sha256 "
                         f"{str(data_meta.get('tokenizer_sha256'))[:12]}) than the model was trained with "
                         f"({str(model_meta.get('tokenizer_sha256'))[:12]}); prepare it with --tokenizer naming the "
                         "tokenizer.json of the model's dataset")
    if data_meta["vocab_size"] > model_vocab_size:
        raise UsageError(f"the dataset's vocabulary ({data_meta['vocab_size']}) is larger than the model's "
                        f"({model_vocab_size})")


def this_ranks_pick(loader, pick):
    """Pick world_size micro-batches from the shared stream and keep this rank's one: every rank
    advances its generator alike, and rank r gets the micro-batches r, r + W, ... of the stream."""
    mine = None
    for r in range(loader.world_size):
        value = pick()
        if r == loader.rank:
            mine = value
    return mine


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch made on the CPU, contiguous, on the device. On cuda through pinned memory, so that the copy
    is queued behind the GPU's work instead of waiting for it (a pageable copy syncs the host every step)."""
    batch = batch.contiguous()
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def stream_seed(seed: int) -> int:
    """A standalone loader's seed: derived from `seed` but distinct from it, so that a loader next to a
    model seeded alike does not repeat the random numbers that initialised the weights."""
    return (seed * 1_000_003 + 7) % 2**63


class Stream:
    """What both loaders share: a generator whose state is the loader's whole state, drawn alike on every
    rank. A subclass says what picks a micro-batch (`pick`: window starts, or synthetic tokens) and what
    batch a pick makes (`batch`)."""

    token_bytes: torch.Tensor | None = None  # bytes of text per token id, for bits per byte; None: not known

    def __init__(self, seed: int, rank: int, world_size: int, generator_state: torch.Tensor | None):
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator()
        if generator_state is not None:
            self.generator.set_state(generator_state)
        else:
            self.generator.manual_seed(stream_seed(seed))

    def pick(self, split: str) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, split: str, pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: its share of the next world_size micro-batches of the stream."""
        return self.batch(split, this_ranks_pick(self, lambda: self.pick(split)))

    def skip(self, split: str, batches: int) -> None:
        """Advance the stream past `batches` micro-batches without reading them."""
        for _ in range(batches):
            self.pick(split)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def split_files(folder: Path, meta: dict) -> dict[str, Path]:
    """The token file of each split: a plain name of a regular file inside the dataset's folder (meta.json
    cannot point elsewhere)."""
    return {split: file_in_folder(folder, meta.get("splits", {}).get(split, {}).get("file", f"{split}.bin"),
                                  f"{folder / 'meta.json'} ({split})") for split in SPLITS}


def split_length(folder: Path, meta: dict, split: str, size: int, block_size: int) -> int:
    """The tokens of a split file of `size` bytes, checked: whole tokens, as many as meta.json says, and more
    than a window of block_size + 1 (a usage error: the context asked for is longer than the data)."""
    itemsize = np.dtype(meta.get("dtype", "uint16")).itemsize
    path = folder / meta.get("splits", {}).get(split, {}).get("file", f"{split}.bin")
    if size % itemsize:
        raise NgptError(f"{path} is truncated ({size} bytes is not a whole number of {itemsize}-byte tokens); "
                        "prepare the dataset again with --force")
    length = size // itemsize
    if length <= block_size + 1:
        raise UsageError(f"the {split} split of {folder.name!r} has {length} tokens, fewer than "
                         f"block_size + 2 = {block_size + 2}; use a smaller --block_size")
    expected = meta.get("splits", {}).get(split, {}).get("tokens")
    if expected not in (None, length):  # cut short, or re-prepared as this loader opened it
        raise NgptError(f"{path} holds {length} tokens where meta.json says {expected}; prepare the dataset "
                        "again with --force")
    return length


def check_block_fits(folder: Path, meta: dict, block_size: int) -> None:
    """Refuse a context longer than the data from the files' sizes, before a model of that context is built."""
    for split, path in split_files(folder, meta).items():
        split_length(folder, meta, split, path.stat().st_size, block_size)


class BatchLoader(Stream):
    """Random (x, y) windows from a split's token file, read through np.memmap.

    The split files are opened once and held open: `ngpt prepare` renames new files over their names
    when it re-prepares the dataset, and a run goes on reading the files it started with. A split file
    must be a plain name of a regular file inside the dataset's folder (meta.json cannot point elsewhere).
    Every rank draws the same stream (seeded by `seed`) and keeps its own share of it: micro-batch
    `rank` of each group of `world_size`, so ranks see different data. The generator's state is
    the loader's whole state.
    """

    def __init__(self, folder: Path, meta: dict, batch_size: int, block_size: int, device: torch.device,
                 seed: int = 1337, rank: int = 0, world_size: int = 1, generator_state: torch.Tensor | None = None):
        self.folder = folder
        self.meta = meta
        self.dtype = np.dtype(meta.get("dtype", "uint16"))
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        super().__init__(seed, rank, world_size, generator_state)
        self.files, self.lengths = {}, {}
        for split, path in split_files(folder, meta).items():
            file = open(path, "rb")  # held for the loader's life (see the class docstring), closed with it
            weakref.finalize(self, file.close)
            self.files[split] = file
            self.lengths[split] = split_length(folder, meta, split, os.fstat(file.fileno()).st_size, block_size)
        self.vocab_size = int(meta["vocab_size"])

    @functools.cached_property
    def token_bytes(self) -> torch.Tensor | None:
        """How many bytes of text each token id stands for (an evaluation's bits per byte divide by their sum
        over the targets); None, with a warning, when the tokenizer's files cannot be loaded."""
        from nanogpt_cli.progress import console
        from nanogpt_cli.tokenizer import from_meta

        try:
            lengths = from_meta(self.meta).token_byte_lengths()
        except NgptError as e:
            console.print(f"[yellow]bits per byte are not reported: {e}[/yellow]", highlight=False)
            return None
        return torch.tensor(lengths, dtype=torch.int64)

    def tokens(self, split: str) -> np.memmap:
        # A new memmap per batch (of the file held open): holding one grows memory without bound (a numpy quirk).
        return np.memmap(self.files[split], dtype=self.dtype, mode="r")

    def pick(self, split: str) -> torch.Tensor:
        """The window starts of the stream's next micro-batch, the same on every rank (see `batch`)."""
        return torch.randint(self.lengths[split] - self.block_size, (self.batch_size,), generator=self.generator)

    def batch(self, split: str, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) windows that start at `starts`, on the device."""
        # One gather of block_size + 1 tokens per row; x and y are its two overlapping windows.
        rows = starts.numpy()[:, None] + np.arange(self.block_size + 1)
        windows = self.tokens(split)[rows]
        if windows.max() >= self.vocab_size:  # a damaged file: the model's embedding would fail on it
            raise NgptError(f"{self.files[split]} holds token id {int(windows.max())}, outside the dataset's "
                            f"vocabulary of {self.vocab_size}; prepare the dataset again with --force")
        windows = torch.from_numpy(windows.astype(np.int64))
        return to_device(windows[:, :-1], self.device), to_device(windows[:, 1:], self.device)


class SyntheticLoader(Stream):
    """Uniformly random tokens of the right shapes: benchmarks without a prepared dataset."""

    def __init__(self, vocab_size: int, batch_size: int, block_size: int, device: torch.device, seed: int = 1337,
                 rank: int = 0, world_size: int = 1, generator_state: torch.Tensor | None = None):
        self.meta = {"tokenizer": "synthetic", "vocab_size": vocab_size}
        self.vocab_size, self.batch_size, self.block_size, self.device = vocab_size, batch_size, block_size, device
        super().__init__(seed, rank, world_size, generator_state)

    def pick(self, split: str) -> torch.Tensor:
        return torch.randint(self.vocab_size, (self.batch_size, self.block_size + 1), generator=self.generator)

    def batch(self, split: str, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_device(data[:, :-1], self.device), to_device(data[:, 1:], self.device)
