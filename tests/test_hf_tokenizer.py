"""GPT-2's BPE files rebuilt from tiktoken: the byte alphabet, merge recovery, and the written files,
which must be OpenAI's own and tokenize exactly as tiktoken does."""

from __future__ import annotations

import hashlib
import json

import pytest

from nanogpt_cli.errors import NgptError
from nanogpt_cli.hf_tokenizer import _merge_pair, write_gpt2_tokenizer
from tests.conftest import require_module

OPENAI_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def test_merge_pair_follows_the_ranks():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert _merge_pair(ranks, b"ab", 3) == (b"a", b"b")
    # "abc" splits into earlier tokens two ways; BPE merges the lower-ranked pair "ab" first
    assert _merge_pair(ranks, b"abc", 5) == (b"ab", b"c")
    with pytest.raises(NgptError, match="could not rebuild GPT-2's merges"):
        _merge_pair({b"a": 0, b"b": 1, b"c": 2, b"abc": 3}, b"abc", 3)  # no merge made it


@pytest.fixture(scope="module")
def written(tmp_path_factory, bpe_files):
    require_module("transformers")
    dest = tmp_path_factory.mktemp("gpt2-tokenizer")
    write_gpt2_tokenizer(dest, model_max_length=32)
    return dest


def test_written_files_are_openais(written, bpe_files):
    """tiktoken reads OpenAI's vocab.bpe and encoder.json (its cache names files by the sha1 of their URL):
    the rebuilt merges.txt and vocab.json are exactly them."""
    def cached(name: str):
        return bpe_files / hashlib.sha1(f"{OPENAI_FILES}{name}".encode()).hexdigest()

    want = [line for line in cached("vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if line]
    got = [line for line in (written / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line]
    assert got == want
    vocab = json.loads((written / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == json.loads(cached("encoder.json").read_text(encoding="utf-8"))


def test_written_tokenizer_encodes_as_tiktoken(written):
    import tiktoken

    transformers = require_module("transformers")
    enc = tiktoken.get_encoding("gpt2")
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(written))
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.model_max_length == 32
    samples = ["Hello world", " leading space", "It's 3.14159 — naïve café's déjà vu!\n\n\tTabs   and  spaces  ",
               "日本語のテキスト 🤖🎉", "def f(x):\n    return x ** 2  # comment\n"]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == enc.encode_ordinary(text), text
        assert tok.decode(ids) == text
