"""Byte-level BPE tokenizers of the user's own: trained on the corpus (`--tokenizer bpe:N`) or read from a
tokenizer.json (`--tokenizer FILE`), and written in ngpt's layout (see tokenizer.BPETokenizer).

The trainer is Hugging Face `tokenizers`' BpeTrainer: a maintained, fast Rust trainer that takes the corpus as
a stream (`train_from_iterator`) and produces the tokenizer.json that transformers loads, so `ngpt export --to hf`
hands over the very file ngpt trained and nothing has to be rebuilt (a tiktoken-compatible trainer such as
nanochat's rustbpe gives ranks only, and the Hugging Face files would then be reconstructed, as hf_tokenizer does
for GPT-2). Encoding stays with tiktoken, which reads the same ranks; `check_agrees` makes sure both give the
same ids before a file is written.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from nanogpt_cli.errors import NgptError, UsageError, one_line
from nanogpt_cli.tokenizer import EOT_TEXT, TOKENIZER_FILE, BPETokenizer, bytes_to_unicode

MIN_VOCAB = 257  # the 256 bytes and <|endoftext|>: a BPE without merges
MAX_VOCAB = 2**32  # token ids are stored as uint32 at most
# Text the two encoders must agree on beyond the corpus: other scripts, emoji, digits, runs of whitespace.
CHECK_TEXT = ("Hello world! It's 2024, naïve café's déjà vu:\n\n  indented\tcode();  €100 🤖 ok  \n"
              "日本語のテキスト, Ελληνικά, русский 12345 '''s 've\r\n\u00a0 <|endoftext|> end")
CHECK_CHARS = 1 << 18  # how much of the training text the encoders are also compared on


def parse_bpe_spec(spec: str) -> int | None:
    """The N of `bpe:N`; None when `spec` names another tokenizer."""
    if spec != "bpe" and not spec.startswith("bpe:"):
        return None
    match = re.fullmatch(r"bpe:(\d+)", spec.replace("_", ""))
    if not match:
        raise UsageError(f"--tokenizer {spec}: give the vocabulary size as a whole number, e.g. bpe:2048")
    size = int(match.group(1))
    if size < MIN_VOCAB:
        raise UsageError(f"--tokenizer {spec}: a byte-level BPE has at least {MIN_VOCAB} tokens (the 256 bytes and "
                         f"{EOT_TEXT}); use bpe:{MIN_VOCAB} or more")
    if size > MAX_VOCAB:
        raise UsageError(f"--tokenizer {spec}: at most 2^32 = {MAX_VOCAB} tokens (ids are stored as uint32)")
    return size


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_byte_size(text: str) -> int:
    """A size in bytes: 100000000, 100MB, 1.5GB, 512MiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) * _UNITS[match.group(2)] < 1:
        raise UsageError(f"--tokenizer-sample {text}: give a size in bytes, e.g. 100MB, 1GB or 500000000")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise NgptError("training or reading a BPE tokenizer needs Hugging Face tokenizers: "
                        "pip install 'nanogpt-cli[tokenizers]'") from None
    return tokenizers


# ---------------------------------------------------------------------------------------------
# ngpt's layout of a byte-level BPE tokenizer.json.


def canonical_json(data: dict, where: str) -> str:
    """The tokenizer.json (Hugging Face's format) of a byte-level BPE with GPT-2's pre-tokenisation, in ngpt's
    layout: ids 0-255 the bytes in order, then one token per merge in merge order, then the special tokens
    (<|endoftext|> added when missing). A second merge that makes an existing token is dropped (tiktoken knows
    one rank per token). The same file always gives the same text, so its sha256 names the tokenizer."""
    def refuse(reason: str) -> UsageError:
        return UsageError(f"{where} is not a byte-level BPE tokenizer ngpt can use: {reason}")

    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise refuse(f"its model is {model.get('type')!r}, not BPE")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise refuse("it needs GPT-2's pre-tokenizer (ByteLevel, use_regex, no add_prefix_space)")
    if data.get("normalizer") is not None or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("dropout"):
        raise refuse("it has a normalizer, byte fallback, subword affixes or dropout")
    added = sorted(data.get("added_tokens") or [], key=lambda token: token["id"])
    plain = [token["content"] for token in added if not token.get("special")]
    if plain:
        raise refuse(f"it has added tokens that are not special ({', '.join(map(repr, plain[:3]))})")
    specials = [token["content"] for token in added]
    if EOT_TEXT not in specials:
        specials.append(EOT_TEXT)
    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    known, merges = set(tokens), []
    for merge in model.get("merges") or []:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left not in known or right not in known:
            raise refuse(f"merge {left!r} + {right!r} joins tokens no earlier merge made")
        if left + right not in known:
            tokens.append(left + right)
            known.add(left + right)
            merges.append(f"{left} {right}")
    unmade = set(model.get("vocab") or {}) - known - set(specials)
    if unmade:
        raise refuse(f"{len(unmade)} of its tokens are made by no merge (e.g. {sorted(unmade)[0]!r})")
    document = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": len(tokens) + i, "content": content, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i, content in enumerate(specials)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # ignore_merges: a pre-token that is itself a token is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": merges},
    }
    return json.dumps(document, ensure_ascii=False, indent=1) + "\n"


def check_agrees(tokenizer: BPETokenizer, text: str) -> None:
    """transformers will encode with the file itself (Hugging Face tokenizers), ngpt with tiktoken: refuse a
    tokenizer on which they differ, rather than export one that encodes differently from its training data."""
    tokenizers = _import_tokenizers()
    reference = tokenizers.Tokenizer.from_str(tokenizer.json)
    reference.encode_special_tokens = True  # "<|endoftext|>" in the text is text, as in tiktoken's encode_ordinary
    want, got = reference.encode(text, add_special_tokens=False).ids, tokenizer.encode(text)
    if want != got:
        at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
        raise NgptError(f"tiktoken and Hugging Face tokenizers encode this BPE differently (from token {at}: "
                        f"{want[at:at + 3]} vs {got[at:at + 3]}); please report it, with the corpus if you can")


# ---------------------------------------------------------------------------------------------
# Training and reading.


def train_bpe(texts: Iterable[str], vocab_size: int, where: str) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` tokens (<|endoftext|> included) trained on `texts`, a stream of pieces
    cut where GPT-2's pre-tokenisation has a boundary anyway (the counts are then exactly the whole text's).

    The trainer runs in a background thread: Rust code holds the main thread for the whole training, where
    Python sees no Ctrl-C, and the main thread's only task is to notice one."""
    tokenizers = _import_tokenizers()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    check: list[str] = []  # the start of the text, to compare the two encoders on
    stop = threading.Event()

    def feed():
        held = 0
        for text in texts:
            if stop.is_set():
                return
            if held < CHECK_CHARS:
                check.append(text[:CHECK_CHARS - held])
                held += len(check[-1])
            yield text

    try:
        interruptible(lambda: tokenizer.train_from_iterator(feed(), trainer))
    finally:
        stop.set()
    data = json.loads(tokenizer.to_str())
    learned = len(data["model"]["vocab"])  # <|endoftext|> included
    if learned < vocab_size:
        raise NgptError(f"{where} has too little text for bpe:{vocab_size}: it allows {learned - MIN_VOCAB} merges, "
                        f"not {vocab_size - MIN_VOCAB}; use --tokenizer bpe:{learned} or less, or more text")
    trained = BPETokenizer(canonical_json(data, where))
    check_agrees(trained, CHECK_TEXT + "".join(check))
    return trained


def interruptible(work: Callable[[], object]) -> object:
    """work() in a daemon thread, the main thread waiting in short joins: a Ctrl-C raises KeyboardInterrupt here
    at once, and the thread, still in Rust code, ends with the process."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed to the main thread, which raises it
            outcome["error"] = e

    thread = threading.Thread(target=run, name="bpe-trainer", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def read_tokenizer_file(path: str | Path) -> BPETokenizer:
    """A byte-level BPE from a tokenizer.json (ngpt's, or any Hugging Face byte-level BPE with GPT-2's
    pre-tokenisation), or from a dataset folder holding one; put in ngpt's layout."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / TOKENIZER_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--tokenizer {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--tokenizer {path}: cannot read it ({one_line(e)})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--tokenizer {path}: does not parse as JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--tokenizer {path}: not a tokenizer.json (a JSON {type(data).__name__})")
    try:
        tokenizer = BPETokenizer(canonical_json(data, str(file)), str(file))
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # the right keys holding the wrong things
        raise UsageError(f"--tokenizer {path}: not a tokenizer.json ({type(e).__name__}: {one_line(e, 100)})"
                         ) from None
    check_agrees(tokenizer, CHECK_TEXT)
    return tokenizer
