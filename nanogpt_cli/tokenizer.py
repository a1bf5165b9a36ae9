"""Character-level, tiktoken and trained byte-level BPE tokenizers behind one encode/decode interface.

A prepared dataset's `meta.json` names its tokenizer; `from_meta` rebuilds it from there (a trained BPE
from the text of its tokenizer.json, which checkpoints carry, so a run samples without its dataset).
"""

from __future__ import annotations

import functools
import hashlib
import json

from nanogpt_cli.errors import NgptError, UsageError, one_line

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's last token
GPT2_META = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT}
EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation (tiktoken's spelling of it; Hugging Face's ByteLevel pre-tokenizer uses the same one)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOKENIZER_FILE = "tokenizer.json"  # a trained BPE's file, in its dataset's folder
# GPT-2's ranks in tiktoken's own format are, byte for byte, tiktoken's r50k_base.tiktoken: this is its sha256
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable unicode characters (how byte-level BPE files
    spell tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


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

    def token_byte_lengths(self) -> list[int]:
        """How many UTF-8 bytes of text each token stands for (bits per byte divide by these)."""
        return [len(c.encode("utf-8", "surrogatepass")) for c in self.itos]

    def meta(self) -> dict:
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "itos": self.itos}


class _TiktokenEncoding:
    """What a tiktoken `Encoding` (`self.enc`) gives every BPE tokenizer: ordinary encoding (the text of a
    special token is plain text), decoding, and each token's bytes."""

    kind = "bpe"

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> list[int]:
        """How many UTF-8 bytes of text each token stands for: special tokens (<|endoftext|>) and unused ids
        stand for none."""
        special = {self.enc.encode_single_token(text) for text in self.enc.special_tokens_set}
        lengths = []
        for token in range(self.enc.n_vocab):
            try:
                lengths.append(0 if token in special else len(self.enc.decode_single_token_bytes(token)))
            except KeyError:  # a hole in the ids (cl100k_base has some)
                lengths.append(0)
        return lengths


def gpt2_ranks_file():
    """Where GPT-2's ranks are kept in tiktoken's format: ngpt's cache (see `tiktoken_encoding`)."""
    from nanogpt_cli.config import cache_dir

    return cache_dir() / "tiktoken" / "r50k_base.tiktoken"


@functools.cache  # one Encoding per process, as tiktoken's own registry keeps them
def tiktoken_encoding(name: str):
    """tiktoken's encoding `name`. tiktoken builds GPT-2's from GPT-2's own vocab.bpe and encoder.json, a parse of
    0.15-0.25 s in every start-up of sample, serve and eval; the same ranks in tiktoken's format read in 0.03 s.
    So GPT-2's ranks are written once to ngpt's cache (atomically; a cache that cannot be written is skipped) and
    read from there when the file's sha256 is r50k_base.tiktoken's, which makes the encoding the same."""
    import base64
    import binascii

    import tiktoken
    import tiktoken_ext.openai_public as openai_public

    pattern = getattr(openai_public, "r50k_pat_str", None)  # what tiktoken's own gpt2 uses (tiktoken >= 0.8)
    if name != "gpt2" or pattern is None:
        return tiktoken.get_encoding(name)
    from nanogpt_cli.atomic import atomic_file, open_regular

    path = gpt2_ranks_file()
    try:
        with open_regular(path) as f:  # no FIFO or device where the file should be
            data = f.read(2 * 2**20)  # the file is 0.8 MB
    except (OSError, NgptError):
        data = b""
    if hashlib.sha256(data).hexdigest() == R50K_SHA256:
        fields = data.split()  # token, rank, token, rank, ...: parsed by C functions alone (47 ms against 95)
        ranks = dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True))
        return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={EOT_TEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    enc = tiktoken.get_encoding(name)
    ranks = getattr(enc, "_mergeable_ranks", None) or {}
    data = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in sorted(ranks.items(),
                                                                                        key=lambda item: item[1]))
    if hashlib.sha256(data).hexdigest() == R50K_SHA256:  # a tiktoken that spells them otherwise: no cache
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                f.write(data)
        except OSError:
            pass
    return enc


class TiktokenTokenizer(_TiktokenEncoding):
    """A tiktoken encoding (gpt2, r50k_base, cl100k_base, o200k_base, ...)."""

    def __init__(self, name: str = "gpt2"):
        import tiktoken

        try:
            self.enc = tiktoken_encoding(name)
        except ValueError:
            known = ", ".join(["char", "bpe:N", *tiktoken.list_encoding_names()])
            raise UsageError(f"unknown tokenizer {name!r}; choose one of: {known}, or a tokenizer.json") from None
        except Exception as e:  # the BPE files are downloaded on first use
            raise NgptError(
                f"could not load the {name!r} BPE files ({type(e).__name__}); they are downloaded on first use, "
                "so connect to the internet once or point TIKTOKEN_CACHE_DIR at a folder holding them"
            ) from None
        self.name = name
        self.eot_token = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size}


class BPETokenizer(_TiktokenEncoding):
    """A byte-level BPE trained on the user's corpus (`ngpt prepare ... --tokenizer bpe:N`), kept as the text of
    a Hugging Face tokenizer.json in ngpt's layout: ids 0-255 are the bytes, id 256 + i the i-th merge, the
    special tokens (<|endoftext|>) last, GPT-2's pre-tokenisation. So a token's id is its merge rank, which is
    what tiktoken reads: ngpt encodes with tiktoken (about 8x faster than `tokenizers`), transformers loads the
    file itself, and both give the same ids (prepare checks it when it writes a file)."""

    name = "bpe"

    def __init__(self, tokenizer_json: str, where: str = "tokenizer.json"):
        import tiktoken

        self.json = tokenizer_json
        self.sha256 = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        ranks, specials = _parse_bpe(tokenizer_json, where)
        self.eot_token = specials.get(EOT_TEXT)
        self.vocab_size = len(ranks) + len(specials)
        self.enc = tiktoken.Encoding(f"bpe-{self.sha256[:12]}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)

    def meta(self) -> dict:
        """The fields meta.json and checkpoints keep; `tokenizer_json` goes into the dataset's tokenizer.json
        (named and fingerprinted by the others), and into checkpoints whole."""
        return {"tokenizer": "bpe", "vocab_size": self.vocab_size, "eot_token": self.eot_token,
                "tokenizer_file": TOKENIZER_FILE, "tokenizer_sha256": self.sha256, "tokenizer_json": self.json}


def _parse_bpe(tokenizer_json: str, where: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """(tiktoken's mergeable ranks, special tokens) of a tokenizer.json in ngpt's layout (see BPETokenizer)."""
    def refuse(reason: str) -> UsageError:
        return UsageError(f"{where} is not a tokenizer.json in the layout ngpt writes ({reason})")

    try:
        data = json.loads(tokenizer_json)
        model, pre = data["model"], data.get("pre_tokenizer") or {}
        vocab, merges = model["vocab"], model["merges"]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{where} does not parse as a tokenizer.json ({type(e).__name__}: {one_line(e, 120)})"
                         ) from None
    if model.get("type") != "BPE" or not model.get("ignore_merges") or data.get("normalizer") is not None:
        raise refuse("a BPE model with ignore_merges and no normalizer")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise refuse("GPT-2's ByteLevel pre-tokenizer")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for spelling, token in vocab.items():
        try:
            ranks[bytes(decoder[c] for c in spelling)] = token
        except KeyError:
            raise refuse(f"token {spelling!r} is not spelled in GPT-2's byte alphabet") from None
    by_id = sorted(ranks, key=ranks.get)
    if [ranks[t] for t in by_id] != list(range(len(ranks))) or by_id[:256] != [bytes([b]) for b in range(256)]:
        raise refuse("ids 0-255 must be the bytes in order and the ids must have no holes")
    spelled = {token: spelling for spelling, token in vocab.items()}
    if len(merges) != len(ranks) - 256 or any(
            "".join(merge.split(" ") if isinstance(merge, str) else merge) != spelled[256 + i]
            for i, merge in enumerate(merges)):
        raise refuse("merge i must make token 256 + i")
    specials = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
    if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
        raise refuse("the special tokens must follow the merges")
    return ranks, specials


def get_tokenizer(name: str) -> CharTokenizer | TiktokenTokenizer:
    """A BPE tokenizer by tiktoken name; "char" needs data and is built by `CharTokenizer.from_text`."""
    if name == "char":
        raise UsageError("the char tokenizer is built from data: use CharTokenizer.from_text")
    return TiktokenTokenizer(name)


def from_meta(meta: dict) -> CharTokenizer | TiktokenTokenizer | BPETokenizer:
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
    if name == "bpe":
        if "tokenizer_json" not in meta:
            raise NgptError("trained-BPE metadata without its tokenizer ('tokenizer_json')")
        return BPETokenizer(meta["tokenizer_json"])
    return TiktokenTokenizer(name)
