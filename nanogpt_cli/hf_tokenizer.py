"""GPT-2's byte-level BPE as Hugging Face tokenizer files, rebuilt from tiktoken's "gpt2" encoding.

tiktoken keeps only the ranks of GPT-2's tokens; transformers wants `vocab.json` (token -> id, in
GPT-2's printable spelling of bytes) and `merges.txt` (the merges in rank order). Both are rebuilt
here, exactly OpenAI's files, and the written tokenizer is checked to encode as tiktoken does.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from nanogpt_cli.errors import NgptError


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


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
    byte_encoder = _bytes_to_unicode()

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
