"""Tokenizers: char-level round trips and errors; tiktoken BPE through TIKTOKEN_CACHE_DIR; a trained BPE's
tokenizer.json in ngpt's layout; the bytes each token stands for."""

from __future__ import annotations

import hashlib
import json

import pytest

from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.tokenizer import (
    EOT_TEXT,
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    bytes_to_unicode,
    from_meta,
    get_tokenizer,
)


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


def test_byte_alphabet_is_gpt2s():
    alphabet = bytes_to_unicode()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256
    assert all(alphabet[b] == chr(b) for b in b"azAZ09!~")  # printable ASCII stands for itself
    assert (alphabet[ord(" ")], alphabet[ord("\n")], alphabet[0]) == ("Ġ", "Ċ", "Ā")
    assert not any(c.isspace() for c in alphabet.values())


def test_token_byte_lengths_count_utf8_bytes_and_none_for_special_tokens(bpe_files):
    assert CharTokenizer(["\n", "a", "é", "€", "🤖"]).token_byte_lengths() == [1, 1, 2, 3, 4]
    gpt2 = get_tokenizer("gpt2")
    lengths = gpt2.token_byte_lengths()
    assert len(lengths) == 50257 and lengths[50256] == 0  # <|endoftext|> stands for no text
    hello = gpt2.encode("Hello, naïve world")
    assert sum(lengths[i] for i in hello) == len("Hello, naïve world".encode())


def tiny_bpe_json(merges: list[str], specials=(EOT_TEXT,), **model) -> str:
    """A tokenizer.json in ngpt's layout, written by hand: the bytes, one token per merge, the specials."""
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    return json.dumps({
        "added_tokens": [{"id": len(tokens) + i, "content": s, "special": True} for i, s in enumerate(specials)],
        "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "model": {"type": "BPE", "ignore_merges": True, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": merges, **model}})


def test_bpe_tokenizer_reads_ngpts_layout_and_round_trips_through_meta():
    tok = BPETokenizer(tiny_bpe_json(["t h", "th e", "Ġ the"]))
    assert (tok.vocab_size, tok.eot_token) == (260, 259)
    assert tok.encode("the then") == [257, 258, 110]  # "the", " the", "n"
    assert tok.decode(tok.encode("naïve 🤖 the")) == "naïve 🤖 the"
    assert tok.encode(EOT_TEXT) != [259] and tok.decode([259]) == EOT_TEXT  # its text is text
    assert tok.token_byte_lengths()[255:] == [1, 2, 3, 4, 0]
    meta = tok.meta()
    assert meta["tokenizer"] == "bpe" and meta["tokenizer_sha256"] == hashlib.sha256(meta["tokenizer_json"].encode()
                                                                                     ).hexdigest()
    assert from_meta(meta).encode("the then") == tok.encode("the then")
    with pytest.raises(NgptError, match="without its tokenizer"):
        from_meta({"tokenizer": "bpe", "vocab_size": 260})


@pytest.mark.parametrize(("text", "reason"), [
    ("{not json", "does not parse as a tokenizer.json"),
    (json.dumps({"model": {"type": "WordLevel", "vocab": {}, "merges": []}}), "a BPE model with ignore_merges"),
    (tiny_bpe_json(["t h"]).replace('"use_regex": true', '"use_regex": false'), "GPT-2's ByteLevel"),
    (tiny_bpe_json(["t h", "h e"]).replace('"h e"', '"e h"'), "merge i must make token 256 \\+ i"),
])
def test_bpe_tokenizer_refuses_other_files_in_one_line(text, reason):
    with pytest.raises(UsageError, match=reason):
        BPETokenizer(text, "x/tokenizer.json")


def test_gpt2_ranks_are_kept_in_tiktokens_format_and_read_back_the_same(bpe_files, tmp_path, monkeypatch):
    import tiktoken

    from nanogpt_cli.tokenizer import R50K_SHA256, gpt2_ranks_file, tiktoken_encoding

    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    reference = tiktoken.get_encoding("gpt2")
    tiktoken_encoding.cache_clear()  # each call below builds its encoding again
    first = tiktoken_encoding("gpt2")  # parsed by tiktoken, then written in tiktoken's format
    kept = gpt2_ranks_file()
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == R50K_SHA256
    real_get_encoding = tiktoken.get_encoding

    def only_others(name):
        assert name != "gpt2", "GPT-2's ranks were parsed again instead of read from the cache"
        return real_get_encoding(name)

    monkeypatch.setattr(tiktoken, "get_encoding", only_others)
    tiktoken_encoding.cache_clear()
    again = tiktoken_encoding("gpt2")
    text = "Hello, naïve world <|endoftext|>  12345\n\n  trailing   "
    for enc in (first, again):
        assert enc.name == "gpt2" and enc.n_vocab == reference.n_vocab and enc.eot_token == reference.eot_token
        assert enc.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
        assert enc.decode(reference.encode(text, allowed_special="all")) == text
    # a damaged cache file is not trusted: the ranks are parsed again and the file rewritten
    monkeypatch.setattr(tiktoken, "get_encoding", real_get_encoding)
    kept.write_bytes(kept.read_bytes().replace(b" 100\n", b" 101\n", 1))
    tiktoken_encoding.cache_clear()
    assert tiktoken_encoding("gpt2").encode(text, allowed_special="all") == reference.encode(text,
                                                                                            allowed_special="all")
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == R50K_SHA256


def test_gpt2_encoding_works_where_the_cache_cannot_be_written_or_is_no_file(bpe_files, tmp_path, monkeypatch):
    import os

    from nanogpt_cli.tokenizer import gpt2_ranks_file, tiktoken_encoding

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "not-a-folder"))
    tiktoken_encoding.cache_clear()
    assert tiktoken_encoding("gpt2").encode("Hello") == [15496]
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "fifo"))
    gpt2_ranks_file().parent.mkdir(parents=True)
    os.mkfifo(gpt2_ranks_file())  # read without blocking on it, then written over
    tiktoken_encoding.cache_clear()
    assert tiktoken_encoding("gpt2").encode("Hello") == [15496]
    tiktoken_encoding.cache_clear()  # the next test's encoding is not one of these
