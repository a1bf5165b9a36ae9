"""The memmap batch loader over a prepared dataset (train.bin / val.bin + meta.json).

`ngpt prepare` (prepare.py) writes the datasets; this module reads them: random windows of
block_size + 1 tokens, different per rank, reproducible from a seed, with a state that a
checkpoint stores so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nanogpt_cli.config import resolve_data_dir
from nanogpt_cli.errors import NgptError

SPLITS = ("train", "val")


def dataset_path(dataset: str, data_dir: str | None = None) -> Path:
    """The folder of a prepared dataset (dataset may be a name or a path to such a folder)."""
    as_path = Path(dataset).expanduser()
    if (as_path / "meta.json").is_file():
        return as_path
    return resolve_data_dir(data_dir) / dataset


def load_meta(folder: Path) -> dict:
    """meta.json of a prepared dataset, or a clear error saying which `ngpt prepare` to run."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        hint = folder.name.replace("_", "-")
        raise NgptError(f"dataset {folder.name!r} is not prepared in {folder.parent}: run `ngpt prepare {hint}` "
                        f"(or `ngpt prepare text FILES --name {folder.name}`), or set --data_dir")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NgptError(f"{meta_file} is corrupt ({e}); prepare the dataset again with --force") from None
    if "vocab_size" not in meta:
        raise NgptError(f"{meta_file} has no vocab_size; prepare the dataset again with --force")
    return meta


class BatchLoader:
    """Random (x, y) windows from a split's token file, read through np.memmap.

    Each rank seeds its own generator (seed + rank) so ranks see different data; the
    generator's state is the loader's whole state.
    """

    def __init__(self, folder: Path, meta: dict, batch_size: int, block_size: int, device: torch.device,
                 seed: int = 1337, rank: int = 0):
        self.folder = folder
        self.meta = meta
        self.dtype = np.dtype(meta.get("dtype", "uint16"))
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.files = {}
        for split in SPLITS:
            name = meta.get("splits", {}).get(split, {}).get("file", f"{split}.bin")
            path = folder / name
            if not path.is_file():
                raise NgptError(f"{path} is missing; prepare the dataset again with --force")
            if path.stat().st_size // self.dtype.itemsize <= block_size + 1:
                raise NgptError(f"the {split} split of {folder.name!r} has {path.stat().st_size // self.dtype.itemsize}"
                                f" tokens, fewer than block_size + 2 = {block_size + 2}; use a smaller --block_size")
            self.files[split] = path

    def tokens(self, split: str) -> np.memmap:
        # A new memmap per batch: holding one open grows memory without bound (a numpy quirk).
        return np.memmap(self.files[split], dtype=self.dtype, mode="r")

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.tokens(split)
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=self.generator)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in starts.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64))
                         for i in starts.tolist()])
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SyntheticLoader:
    """Uniformly random tokens of the right shapes: benchmarks without a prepared dataset."""

    def __init__(self, vocab_size: int, batch_size: int, block_size: int, device: torch.device, seed: int = 1337,
                 rank: int = 0):
        self.meta = {"tokenizer": "synthetic", "vocab_size": vocab_size}
        self.vocab_size, self.batch_size, self.block_size, self.device = vocab_size, batch_size, block_size, device
        self.generator = torch.Generator().manual_seed(seed + rank)

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.randint(self.vocab_size, (self.batch_size, self.block_size + 1), generator=self.generator)
        return data[:, :-1].to(self.device), data[:, 1:].to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
