"""The batch loader reads what `ngpt prepare` wrote, in the dtype meta.json names."""

import json

import numpy as np
import pytest
import torch

from nanogpt_cli import prepare as P
from nanogpt_cli.data import BatchLoader, dataset_path, load_meta
from nanogpt_cli.errors import NgptError

CPU = torch.device("cpu")


def _windows_are_contiguous(loader: BatchLoader, tokens: dict[str, np.ndarray], block: int) -> None:
    """Every x row is a run of the split's tokens and y is x shifted by one."""
    for split in ("train", "val"):
        data = tokens[split].astype(np.int64)
        for _ in range(5):
            x, y = loader.get_batch(split)
            assert x.dtype == torch.int64 and x.shape == (loader.batch_size, block)
            for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
                starts = np.flatnonzero(data[:-block] == row_x[0])
                assert any(np.array_equal(data[s:s + block], row_x) and np.array_equal(data[s + 1:s + block + 1], row_y)
                           for s in starts)


def test_uint32_ids_above_65535_are_read_as_uint32(tmp_path):
    """A large vocabulary (cl100k_base, o200k_base) is stored as uint32; the loader follows meta.json."""
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tokens = {"train": np.arange(70_000, 70_000 + 500, dtype=np.uint32),  # distinct ids, all above uint16
              "val": rng.choice(np.arange(65_530, 100_277, dtype=np.uint32), size=200, replace=False)}
    for split, ids in tokens.items():
        ids.tofile(folder / f"{split}.bin")
    meta = {"format": 1, "name": "big", "tokenizer": "cl100k_base", "vocab_size": 100277, "dtype": "uint32",
            "splits": {s: {"file": f"{s}.bin", "tokens": len(ids)} for s, ids in tokens.items()}}
    (folder / "meta.json").write_text(json.dumps(meta))
    loader = BatchLoader(folder, load_meta(folder), batch_size=3, block_size=16, device=CPU, seed=1)
    assert loader.dtype == np.uint32
    _windows_are_contiguous(loader, tokens, 16)
    x, _ = loader.get_batch("train")
    assert int(x.min()) >= 70_000  # read as uint16 these would be small numbers and zeros


def test_a_prepared_uint32_dataset_loads(tmp_path):
    """End to end: a char vocabulary of 70,000 characters is written as uint32, and the loader reads it back."""
    from nanogpt_cli.tokenizer import CharTokenizer

    rng = np.random.default_rng(1)
    text = "".join(chr(0x10000 + int(i)) for i in rng.permutation(70_000))  # every character once
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    P.prepare_text([str(tmp_path / "wide.txt")], P.PrepareOptions(data_dir=tmp_path / "data", tokenizer="char",
                                                                   quiet=True))
    folder = dataset_path("wide", str(tmp_path / "data"))
    meta = load_meta(folder)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    tokens = {s: np.fromfile(folder / f"{s}.bin", dtype=np.uint32) for s in ("train", "val")}
    assert len(tokens["train"]) == 63_000 and int(tokens["val"].max()) > 65_535
    itos = CharTokenizer(meta["itos"]).itos
    assert "".join(itos[i] for i in np.concatenate([tokens["train"], tokens["val"]])) == text
    loader = BatchLoader(folder, meta, batch_size=2, block_size=32, device=CPU, seed=3)
    _windows_are_contiguous(loader, tokens, 32)


def test_unprepared_and_too_short_datasets_say_what_to_do(tmp_path):
    with pytest.raises(NgptError, match="not prepared.*ngpt prepare"):
        load_meta(tmp_path / "nothing")
    folder = tmp_path / "short"
    folder.mkdir()
    for split in ("train", "val"):
        np.arange(10, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 10, "dtype": "uint16"}))
    with pytest.raises(NgptError, match="fewer than block_size"):
        BatchLoader(folder, load_meta(folder), batch_size=1, block_size=16, device=CPU)


def test_a_dataset_name_is_found_with_dashes_or_underscores(tmp_path):
    from tests.conftest import write_char_dataset

    write_char_dataset(tmp_path, "shakespeare_char")
    assert dataset_path("shakespeare-char", str(tmp_path)) == tmp_path / "shakespeare_char"
    assert dataset_path("shakespeare_char", str(tmp_path)) == tmp_path / "shakespeare_char"


def test_a_missing_dataset_suggests_the_near_match_or_the_recipe(tmp_path):
    from tests.conftest import write_char_dataset

    with pytest.raises(NgptError, match=r"run `ngpt prepare shakespeare-char` \(it makes 'shakespeare_char'\)"):
        load_meta(dataset_path("shakespeare-char", str(tmp_path)))
    write_char_dataset(tmp_path, "my_notes")
    with pytest.raises(NgptError, match="did you mean --dataset=my_notes"):
        load_meta(dataset_path("my_note", str(tmp_path)))
