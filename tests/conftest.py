"""Shared fixtures: small datasets written by the tests themselves, and tiny configs."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import numpy as np
import pytest
import torch

from nanogpt_cli.config import TrainConfig, build

# The tests train tiny models, for which one thread per process is fastest (thread start-up and
# synchronisation cost more than they save), and subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU: without one they are skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (this torch sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TEXT = "".join(f"{w} the quick brown fox jumps over the lazy dog {i % 7}.\n"
               for i, w in enumerate(["ROMEO:", "JULIET:", "First Citizen:", "MENENIUS:"] * 150))


def write_char_dataset(data_dir: Path, name: str = "tiny_char", text: str = TEXT) -> Path:
    """A character-level dataset in the prepared format (train.bin, val.bin, meta.json)."""
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = {"format": 1, "name": name, "tokenizer": "char", "vocab_size": len(chars), "itos": chars,
            "dtype": "uint16", "eot_token": None,
            "splits": {"train": {"file": "train.bin", "tokens": cut}, "val": {"file": "val.bin",
                                                                             "tokens": len(text) - cut}}}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--max_iters=6", "--lr_decay_iters=6", "--warmup_iters=2",
        "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--compile=False", "--dataset=tiny_char",
        "--learning_rate=1e-3", "--dtype=float32"]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    write_char_dataset(d)
    return d


@pytest.fixture
def tiny_cfg(tmp_path, data_dir):
    def make(*extra: str) -> TrainConfig:
        return build(TrainConfig, None, [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *extra])
    return make


def in_ci() -> bool:
    """CI=true: every extra is installed and the shared test material is there (.ci/run), so a test
    that lacks either fails instead of skipping, and a broken CI setup cannot pass unseen."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """What a test does without something it needs: skip with `reason`, or fail under CI."""
    if in_ci():
        pytest.fail(f"{reason}, which CI must provide (CI=true)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """`import name` for a test of an optional extra: the module, else a skip (a failure under CI).
    Works at module level too, for a test file that needs the extra throughout."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"needs {name}, an optional extra ({type(e).__name__}: {e})")


def shared_file(var: str) -> Path:
    """A file or folder of the shared test material, found through an environment variable: the path,
    else a skip (a failure under CI)."""
    value = os.environ.get(var)
    if not value or not Path(value).exists():
        state = "is not set" if not value else f"points at {value}, which does not exist"
        missing(f"{var} {state} (it points at shared test material; .ci/run sets it)")
    return Path(value)


@pytest.fixture(scope="session")
def bpe_files() -> Path:
    """tiktoken's GPT-2 BPE files (TIKTOKEN_CACHE_DIR): tests never download them."""
    return shared_file("TIKTOKEN_CACHE_DIR")


needs_bpe = pytest.mark.usefixtures("bpe_files")


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare's input.txt (NGPT_TEST_SHAKESPEARE), the corpus of nanoGPT's reference numbers."""
    return shared_file("NGPT_TEST_SHAKESPEARE")


def poison_training_from(monkeypatch, call: int, poison) -> None:
    """From the model's `call`-th training forward on, pass its loss through `poison`
    (e.g. multiply by NaN, or an op whose gradient is infinite)."""
    from nanogpt_cli.model import GPT

    original, calls = GPT.forward, [0]

    def forward(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] >= call:
                loss = poison(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
