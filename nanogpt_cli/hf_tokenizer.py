"""ngpt's tokenizers as Hugging Face tokenizer files, each checked to encode exactly as ngpt does.

* GPT-2's byte-level BPE, rebuilt from tiktoken's "gpt2" encoding: tiktoken keeps only the ranks of
  GPT-2's tokens; transformers wants `vocab.json` (token -> id, in GPT-2's printable spelling of bytes)
  and `merges.txt` (the merges in rank order). Both are rebuilt here, exactly OpenAI's files.
* A BPE trained by `ngpt prepare --tokenizer bpe:N`: its tokenizer.json is already Hugging Face's format.
* A char-level vocabulary: a WordLevel model over single characters (`tokenizers`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from nanogpt_cli.errors import NgptError
from nanogpt_cli.tokenizer import EOT_TEXT, BPETokenizer, CharTokenizer, bytes_to_unicode


def _merge_pair(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: byte-level BPE of `token` using only earlier merges."""
    splits = [(token[:i], token[i:]) for i in range(1, len(token))]
    candidates = [(a, b) for a, b in splits if ranks.get(a, rank) < rank and ranks.get(b, rank) < rank]
    if len(candidates) == 1:
        return candidates[0]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise NgptError(f"could not rebuild GPT-2's merges from tiktoken (token {token!r})")
    return parts[0], parts[1]


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab.json and merges.txt contents, rebuilt from tiktoken's "gpt2" encoding."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    ranks: dict[bytes, int] = enc._mergeable_ranks
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    vocab.update(enc._special_tokens)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            a, b = _merge_pair(ranks, token, rank)
            merges.append(f"{to_str(a)} {to_str(b)}")
    return vocab, merges


_TOKENIZER_CHECK = "Hello world! It's 2024, naïve café:\n\n  indented\tcode();  €100 🤖 ok  \n"


def write_gpt2_tokenizer(dest: Path, model_max_length: int) -> None:
    """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json for GPT-2 BPE, rebuilt from
    tiktoken (the tokenizer ngpt trains with); from the hub when tiktoken's files are unavailable.
    Needs transformers (`hf.export_hf`, the caller, says how to install it)."""
    import transformers

    Tok = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
    enc = None
    try:
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        vocab, merges = gpt2_vocab_and_merges()
    except (ImportError, OSError, ValueError) as e:  # tiktoken's BPE files are downloaded on first use
        tiktoken_error = e
        try:
            tok = Tok.from_pretrained("openai-community/gpt2")
        except (OSError, ValueError):
            raise NgptError(
                "could not export the GPT-2 tokenizer (nothing was written): tiktoken's GPT-2 files could not be "
                f"loaded ({type(tiktoken_error).__name__}) and the Hugging Face Hub could not be reached; point "
                "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's gpt2 files and export again"
            ) from None
    else:
        (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        if "vocab" in inspect.signature(Tok.__init__).parameters:  # transformers 5
            tok = Tok(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
        else:  # transformers 4 reads the files
            tok = Tok.from_pretrained(str(dest))
    tok.model_max_length = model_max_length
    tok.save_pretrained(str(dest))
    if enc is not None:  # the written files must tokenize as ngpt does
        written = Tok.from_pretrained(str(dest))
        ids = written(_TOKENIZER_CHECK, add_special_tokens=False)["input_ids"]
        if ids != enc.encode_ordinary(_TOKENIZER_CHECK):
            raise NgptError("the tokenizer written for the export does not encode like tiktoken's gpt2")


def _save_tokenizer(dest: Path, tokenizer_object, model_max_length: int, encode, check_text: str,
                    **special_tokens) -> None:
    """transformers' files (tokenizer.json, tokenizer_config.json) for a `tokenizers.Tokenizer`, then
    checked: AutoTokenizer must read them back and give `encode`'s ids for `check_text`."""
    import transformers

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, model_max_length=model_max_length,
                                                clean_up_tokenization_spaces=False, **special_tokens)
    fast.save_pretrained(str(dest))
    written = transformers.AutoTokenizer.from_pretrained(str(dest))
    ids = written(check_text, verbose=False)["input_ids"]  # verbose: the check may be longer than the context
    if ids != encode(check_text) or written.decode(ids) != check_text:
        raise NgptError("the tokenizer written for the export does not encode like ngpt's")


def write_bpe_tokenizer(dest: Path, tokenizer: BPETokenizer, model_max_length: int) -> None:
    """A trained BPE's tokenizer files, <|endoftext|> as bos, eos and unk token (as GPT-2's)."""
    import tokenizers

    specials = {name: EOT_TEXT for name in ("bos_token", "eos_token", "unk_token")} \
        if tokenizer.eot_token is not None else {}
    _save_tokenizer(dest, tokenizers.Tokenizer.from_str(tokenizer.json), model_max_length, tokenizer.encode,
                    _TOKENIZER_CHECK, **specials)


def write_char_tokenizer(dest: Path, tokenizer: CharTokenizer, model_max_length: int) -> None:
    """A char-level vocabulary as a WordLevel model: every character its own pre-token, looked up whole,
    and decoded by joining the characters (not with spaces, WordLevel's default). A character outside the
    vocabulary fails in transformers as it does in ngpt."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = Tokenizer(models.WordLevel(tokenizer.stoi, unk_token=None))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    chars.decoder = decoders.Fuse()
    check = "".join(tokenizer.itos) + "".join(reversed(tokenizer.itos))
    _save_tokenizer(dest, chars, model_max_length, tokenizer.encode, check)
