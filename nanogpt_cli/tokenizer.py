"""Character-level and tiktoken BPE tokenizers behind one encode/decode interface.

A prepared dataset's `meta.json` names its tokenizer; `from_meta` rebuilds it from there.
"""

from __future__ import annotations

from nanogpt_cli.errors import NgptError, UsageError

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's last token
GPT2_META = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT}


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters in the data."""

    kind = "char"
    eot_token = None

    def __init__(self, chars: list[str] | str):
        self.itos = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.name = "char"

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UsageError(f"character {e.args[0]!r} is not in this model's "
                             f"{self.vocab_size}-character vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def meta(self) -> dict:
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "itos": self.itos}


class TiktokenTokenizer:
    """A tiktoken encoding (gpt2, r50k_base, cl100k_base, o200k_base, ...)."""

    kind = "bpe"

    def __init__(self, name: str = "gpt2"):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(name)
        except ValueError:
            known = ", ".join(["char", *tiktoken.list_encoding_names()])
            raise UsageError(f"unknown tokenizer {name!r}; choose one of: {known}") from None
        except Exception as e:  # the BPE files are downloaded on first use
            raise NgptError(
                f"could not load the {name!r} BPE files ({type(e).__name__}); they are downloaded on first use, "
                "so connect to the internet once or point TIKTOKEN_CACHE_DIR at a folder that holds them"
            ) from None
        self.name = name
        self.eot_token = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size}


def get_tokenizer(name: str) -> CharTokenizer | TiktokenTokenizer:
    """A BPE tokenizer by tiktoken name; "char" needs data and is built by `CharTokenizer.from_text`."""
    if name == "char":
        raise UsageError("the char tokenizer is built from data: use CharTokenizer.from_text")
    return TiktokenTokenizer(name)


def from_meta(meta: dict) -> CharTokenizer | TiktokenTokenizer:
    """The tokenizer a dataset or checkpoint was made with, from its metadata."""
    name = meta.get("tokenizer", "gpt2")
    if name is None:  # e.g. a Hugging Face GPT-2 with a vocabulary of its own
        raise NgptError(f"this model's tokenizer is unknown to ngpt (a vocabulary of {meta.get('vocab_size')} tokens, "
                        "not GPT-2's 50257): it can be evaluated on data prepared for it and exported, but not "
                        "sampled from")
    if name == "char":
        if "itos" not in meta:
            raise NgptError("char-level metadata without its vocabulary ('itos')")
        return CharTokenizer(meta["itos"])
    return TiktokenTokenizer(name)
