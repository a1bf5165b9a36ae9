"""Tokenizers: char-level round trips and errors; tiktoken BPE through TIKTOKEN_CACHE_DIR."""

from __future__ import annotations

import pytest

from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.tokenizer import CharTokenizer, TiktokenTokenizer, from_meta, get_tokenizer


def test_char_vocabulary_is_the_sorted_characters_and_round_trips():
    text = "to be, or not to be:\nthat is the question"
    tok = CharTokenizer.from_text(text)
    assert tok.itos == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size
    assert from_meta(tok.meta()).itos == tok.itos  # what meta.json and checkpoints store


def test_char_outside_the_vocabulary_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UsageError, match=r"character 'z' is not in this model's 3-character vocabulary"):
        tok.encode("abz")


def test_metadata_errors():
    with pytest.raises(NgptError, match="without its vocabulary"):
        from_meta({"tokenizer": "char", "vocab_size": 3})
    with pytest.raises(NgptError, match="tokenizer is unknown to ngpt .*300 tokens"):
        from_meta({"tokenizer": None, "vocab_size": 300})
    with pytest.raises(UsageError, match="built from data"):
        get_tokenizer("char")


def test_unknown_encoding_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown tokenizer 'gpt7'; choose one of: char, .*gpt2"):
        TiktokenTokenizer("gpt7")


def test_gpt2_bpe_round_trip_and_end_of_text(bpe_files):
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    text = "Hello world <|endoftext|> is plain text here"
    ids = tok.encode(text)
    assert 50256 not in ids  # ordinary encoding: the special token's text is not the special token
    assert tok.decode(ids) == text
    assert tok.encode_batch(["a b", "c"], num_threads=2) == [tok.encode("a b"), tok.encode("c")]
    assert from_meta({"tokenizer": "gpt2", "vocab_size": 50257}).encode("Hello") == tok.encode("Hello")
    assert from_meta({}).name == "gpt2"  # metadata without a tokenizer: GPT-2's, as nanoGPT assumes
