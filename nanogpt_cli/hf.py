"""GPT-2 weights in and out: Hugging Face `transformers` folders and hub models, and nanoGPT checkpoints.

* `load_hf_gpt2` turns a `GPT2LMHeadModel` (a hub name like "gpt2-medium", a hub id "owner/name",
  or a local folder with config.json) into an ngpt `GPT`, Conv1D weights transposed.
* `export_hf` writes an ngpt `GPT` as a folder that `GPT2LMHeadModel.from_pretrained` loads, with
  the GPT-2 tokenizer files when the model speaks GPT-2 BPE.
* `load_nanogpt_checkpoint`, `read_nanogpt_meta_pkl` and `find_nanogpt_meta` read karpathy/nanoGPT's
  `ckpt.pt` and `meta.pkl` without unpickling arbitrary objects.

`transformers` is an optional dependency (the `hf` extra) and is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import re
from pathlib import Path

import torch

from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.model import GPT, GPTConfig

PRETRAINED = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
GPT2_META = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_token": GPT2_EOT}
# tiktoken encodings whose ranks and split pattern are exactly GPT-2's byte-level BPE
GPT2_BPE_NAMES = ("gpt2", "r50k_base")
NGPT_META_FILE = "ngpt_meta.json"  # what ngpt knows that config.json cannot say (char vocabulary, bias)

# Weights that are nn.Linear (out, in) in ngpt and Conv1D (in, out) in transformers.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
_INSTALL_HINT = "install the hf extra: pip install 'nanogpt-cli[hf]'"
_LOCAL_HINT = "--init_from=/path/to/folder with config.json and model.safetensors"


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise NgptError(f"Hugging Face transformers is not installed; {_INSTALL_HINT}") from None
    return transformers


@contextlib.contextmanager
def _no_progress_bars(transformers, quiet: bool = True):
    """Hide transformers' "Loading weights"/"Writing model shards" bars (kept for hub downloads)."""
    tlog = transformers.utils.logging
    hide = quiet and tlog.is_progress_bar_enabled()
    if hide:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            tlog.enable_progress_bar()


@contextlib.contextmanager
def _quiet_libraries():
    """Keep huggingface_hub's and transformers' warnings out of ngpt's output (shown with --verbose):
    without a network the hub logs a line per failed request and per retry ("Retrying in 1s [Retry 1/5]"),
    a dozen lines before ngpt's one-line error; transformers logs a load report whose problems
    `_load_hf_gpt2` turns into one error itself."""
    import logging

    from nanogpt_cli.progress import is_verbose

    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    if not is_verbose():
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _known_names() -> str:
    return ", ".join(PRETRAINED)


def is_hf_source(init_from: str) -> bool:
    """Whether `--init_from` names Hugging Face weights: a gpt2* name, a local folder holding a
    config.json, or something shaped like a hub id ("owner/name") that is not a local path."""
    if init_from in ("scratch", "resume") or not init_from:
        return False
    if init_from in PRETRAINED:
        return True
    path = Path(init_from)
    if path.is_dir():
        return (path / "config.json").is_file()
    if os.path.exists(init_from):  # a file: not a hub model
        return False
    if init_from.startswith("gpt2"):
        return True
    return bool(_HUB_ID.match(init_from))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NgptError(f"could not read {path}: {type(e).__name__}: {e}") from None


# transformers' activation_function -> GPTConfig.activation (gelu_pytorch_tanh is gelu_new's formula, fused)
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}


def _check_gpt2_config(cfg, source: str) -> None:
    """Refuse GPT-2 variants the ngpt model cannot compute exactly."""
    def get(key, default=None):
        return getattr(cfg, key, default)

    model_type = get("model_type")
    if model_type != "gpt2":
        raise UsageError(f"{source} is a {model_type!r} model; only GPT-2 (model_type 'gpt2') can be loaded")
    problems = []
    act = get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        problems.append(f"activation_function={act!r} (ngpt has GPT-2's gelu_new, the exact gelu and relu2)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if get(flag, False):
            problems.append(f"{flag}=True")
    if not get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    n_inner, n_embd = get("n_inner"), get("n_embd")
    if n_inner is not None and n_inner != 4 * n_embd:
        problems.append(f"n_inner={n_inner} (ngpt's MLP is 4 * n_embd = {4 * n_embd})")
    eps = get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon={eps} (ngpt uses 1e-5)")
    if problems:
        raise UsageError(f"{source} uses GPT-2 options ngpt's model cannot represent: {', '.join(problems)}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host takes a TCP connection. Offline, the Hub client retries for ~25 s before it
    fails; with this answer an offline machine loads a cached model at once (local_files_only) and an
    uncached one fails at once. Behind a proxy the proxy decides, so the answer is yes without a probe."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


def _hub_error(name: str, e: Exception) -> NgptError:
    text = " ".join(str(e).split())
    lowered = text.lower()
    offline = any(w in lowered for w in ("connect", "offline", "network", "resolve host", "timed out", "timeout"))
    if offline or not isinstance(e, OSError):
        return NgptError(
            f"could not download {name!r}: the Hugging Face Hub could not be reached ({type(e).__name__}); "
            f"download the model elsewhere and pass its local folder: {_LOCAL_HINT}"
        )
    first = text.split(". ")[0][:200]
    return NgptError(
        f"could not load {name!r} from the Hugging Face Hub ({first}); "
        f"check the name, or pass a local folder: {_LOCAL_HINT}"
    )


def _resolve_source(name_or_path: str) -> tuple[str, Path | None]:
    """(what to hand to from_pretrained, the local folder or None); checks names and folders."""
    path = Path(name_or_path).expanduser()
    if name_or_path in PRETRAINED and not (path / "config.json").is_file():
        return name_or_path, None
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UsageError(f"{name_or_path} is not a Hugging Face model folder: it has no config.json")
        model_type = _read_json(config_file).get("model_type")
        if model_type != "gpt2":
            raise UsageError(
                f"{name_or_path} holds a {model_type!r} model (config.json model_type); "
                "only GPT-2 (model_type 'gpt2') can be loaded"
            )
        return str(path), path
    if path.exists():
        raise UsageError(f"{name_or_path} is a file; pass the Hugging Face model folder that holds config.json")
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith(("./", "../")):
        return name_or_path, None
    raise UsageError(
        f"unknown model {name_or_path!r}: not a local folder nor a hub id (owner/name); "
        f"pretrained GPT-2 models: {_known_names()}"
    )


def _gpt_on_meta(config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> GPT:
    """An ngpt GPT holding `state_dict`'s tensors, without paying for a random init."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_embeddings:
        model.transformer.wte.weight = model.lm_head.weight  # assign=True made two Parameters: tie again
    return model


def _read_ngpt_meta(folder: Path | None) -> dict | None:
    if folder is None or not (folder / NGPT_META_FILE).is_file():
        return None
    data = _read_json(folder / NGPT_META_FILE)
    return data if isinstance(data, dict) else None


def _tokenizer_meta(vocab_size: int, folder: Path | None, saved: dict | None) -> dict:
    """The tokenizer metadata of an imported model: what ngpt wrote on export, else GPT-2 BPE when
    the vocabulary is GPT-2's; else {"tokenizer": None, ...}: unknown, the caller must choose."""
    if saved and isinstance(saved.get("meta"), dict) and saved["meta"].get("tokenizer"):
        return dict(saved["meta"])
    if vocab_size == GPT2_VOCAB_SIZE:
        return dict(GPT2_META)
    if folder is not None and vocab_size > GPT2_VOCAB_SIZE and (folder / "vocab.json").is_file():
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            vocab = {}
        if len(vocab) == GPT2_VOCAB_SIZE and vocab.get("<|endoftext|>") == GPT2_EOT:
            return dict(GPT2_META)  # GPT-2 BPE with a padded embedding table
    return {"tokenizer": None, "vocab_size": vocab_size}


def load_hf_gpt2(name_or_path: str, dropout: float | None = None) -> tuple[GPT, dict]:
    """Load a Hugging Face GPT-2 (hub name, hub id or local folder) as an ngpt GPT in float32.

    Returns (model, meta): meta describes the tokenizer, {"tokenizer": "gpt2", "vocab_size": 50257,
    "eot_token": 50256} for GPT-2 BPE; a folder written by `export_hf` gives back the ngpt metadata
    it was exported with (e.g. a char-level vocabulary); "tokenizer" is None when unknown.
    The model has bias=True (GPT-2 always has biases), except a folder that `export_hf` wrote
    from a bias=False model, whose biases are all zero: it comes back with bias=False. An output layer
    of its own (tie_word_embeddings=false) comes back untied.
    `dropout` overrides the dropout (default 0.0, as nanoGPT does for pretrained weights).
    """
    source, folder = _resolve_source(name_or_path)
    transformers = _import_transformers()
    with _quiet_libraries():
        return _load_hf_gpt2(name_or_path, source, folder, transformers, dropout)


def _load_hf_gpt2(name_or_path: str, source: str, folder: Path | None, transformers, dropout: float | None):
    cached_only = folder is None and not hub_reachable()  # offline: the local cache, without the Hub's retries
    try:
        hf_config = transformers.AutoConfig.from_pretrained(source, local_files_only=cached_only)
    except OSError as e:
        raise _hub_error(name_or_path, e) from None
    except (ValueError, KeyError) as e:  # a model_type this transformers does not know
        raise UsageError(f"{name_or_path} is not a GPT-2 model: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # connection errors from requests/httpx that are not OSErrors
        if folder is None:
            raise _hub_error(name_or_path, e) from None
        raise
    _check_gpt2_config(hf_config, name_or_path)
    try:
        with _no_progress_bars(transformers, quiet=folder is not None):
            # shape mismatches come back in `info` (not as transformers' RuntimeError after a long report)
            hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(
                source, config=hf_config, output_loading_info=True, ignore_mismatched_sizes=True,
                local_files_only=cached_only)
    except OSError as e:
        if folder is not None:
            raise NgptError(f"could not load the weights in {name_or_path}: {' '.join(str(e).split())[:300]}") from None
        raise _hub_error(name_or_path, e) from None
    except Exception as e:
        if folder is None and type(e).__module__.split(".")[0] in ("requests", "httpx", "urllib3", "huggingface_hub"):
            raise _hub_error(name_or_path, e) from None
        if folder is not None:  # e.g. a truncated model.safetensors
            reason = " ".join(str(e).split())[:300]
            raise NgptError(f"could not load the weights in {name_or_path}: {type(e).__name__}: {reason}") from None
        raise
    # transformers fills missing or misshapen weights with random values and only logs it: refuse them
    mismatched = [f"{k} {tuple(a)} (config.json wants {tuple(b)})" for k, a, b in info.get("mismatched_keys") or []]
    if mismatched:
        raise NgptError(f"{name_or_path}: weights do not fit its config.json: {'; '.join(mismatched[:3])}"
                        f"{' ...' if len(mismatched) > 3 else ''}")
    tied = getattr(hf_config, "tie_word_embeddings", True)  # a tied model's file has no lm_head of its own
    missing = sorted(k for k in info.get("missing_keys") or []
                     if (k != "lm_head.weight" or not tied) and not k.endswith((".attn.bias", ".attn.masked_bias")))
    if missing:
        raise NgptError(f"{name_or_path} lacks weights ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''});"
                        " is it a complete GPT2LMHeadModel?")
    hf_sd = hf_model.state_dict()
    vocab_size, n_embd = hf_sd["transformer.wte.weight"].shape

    saved = _read_ngpt_meta(folder)
    config = GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=n_embd,
        dropout=0.0 if dropout is None else float(dropout),
        bias=True,
        activation=HF_ACTIVATIONS[getattr(hf_config, "activation_function", "gelu_new")],
        tie_embeddings=tied,
    )
    bias_keys = [k for k in hf_sd if k.endswith(".bias") and k.startswith("transformer.")]
    if saved is not None and saved.get("bias") is False and all(not hf_sd[k].any() for k in bias_keys):
        config.bias = False

    sd = {}
    with torch.device("meta"):
        wanted = GPT(config).state_dict().keys()
    for key in wanted:
        hf_key = "transformer.wte.weight" if key == "lm_head.weight" and tied else key
        if hf_key not in hf_sd:
            raise NgptError(f"{name_or_path} has no weight {hf_key!r}; is it a GPT2LMHeadModel?")
        t = hf_sd[hf_key].detach().to(torch.float32)
        if key.endswith(_CONV1D):
            t = t.t()
        sd[key] = t.contiguous()
    model = _gpt_on_meta(config, sd)
    del hf_model, hf_sd
    return model, _tokenizer_meta(vocab_size, folder, saved)


# ---------------------------------------------------------------------------------------------
# export


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


def _write_gpt2_tokenizer(dest: Path, model_max_length: int) -> None:
    """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json for GPT-2 BPE, rebuilt from
    tiktoken (the tokenizer ngpt trains with); from the hub when tiktoken's files are unavailable."""
    transformers = _import_transformers()
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
                f"wrote the weights to {dest} but not the tokenizer: tiktoken's GPT-2 files could not be loaded "
                f"({type(tiktoken_error).__name__}) and the Hugging Face Hub could not be reached; point "
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
            raise NgptError(f"the tokenizer written to {dest} does not encode like tiktoken's gpt2")


def _hf_state_dict(model: GPT, hf_keys: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = ours["transformer.wte.weight"].dtype
    out = {}
    for key, shape in hf_keys.items():
        if key in ours:
            t = ours[key]
            if key.endswith(_CONV1D):
                t = t.t()
            t = t.contiguous().clone()
        elif key.endswith(".bias") and not model.config.bias:
            t = torch.zeros(shape, dtype=dtype)  # a zero bias computes exactly what no bias does
        else:
            raise NgptError(f"cannot export: transformers' GPT-2 has {key!r}, which ngpt's model lacks")
        if tuple(t.shape) != tuple(shape):
            raise NgptError(f"cannot export {key}: shape {tuple(t.shape)}, transformers expects {tuple(shape)}")
        out[key] = t
    return out


# The model options transformers' GPT2LMHeadModel cannot compute, with what it has instead.
UNEXPORTABLE = (
    ("position", "rope", "a learned position table"),
    ("norm", "rmsnorm", "LayerNorm"),
    ("qk_norm", True, "no norm on queries and keys"),
    ("embedding_norm", True, "no norm after the embedding"),
)


def check_exportable(config: GPTConfig) -> None:
    """A usage error naming the first option of `config` that GPT-2 in transformers cannot compute exactly."""
    for key, value, gpt2_has in UNEXPORTABLE:
        if getattr(config, key) == value:
            raise UsageError(f"cannot export to Hugging Face GPT-2: the model has {key}={value} and "
                             f"GPT2LMHeadModel has {gpt2_has}")
    if config.logit_softcap is not None:
        raise UsageError(f"cannot export to Hugging Face GPT-2: the model has logit_softcap={config.logit_softcap} "
                         "and GPT2LMHeadModel does not cap its logits")


def export_hf(model: GPT, dest: str | Path, meta: dict | None = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder: config.json, generation_config.json,
    model.safetensors (lm_head tied to wte, unless the model unties them), ngpt_meta.json, and, for GPT-2
    BPE models, the GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json).

    GPT2LMHeadModel computes the GPT-2 path and, of the modern options, relu2 (its activation_function),
    an untied head (tie_word_embeddings=False) and zero-initialised projections (an init only); a model
    with rotary positions, RMSNorm, QK-norm, a norm after the embedding or soft-capped logits is refused
    (`check_exportable`). `meta` is the model's tokenizer metadata (None: GPT-2 BPE when the vocabulary
    is big enough). A bias=False model is exported with all-zero biases, which GPT-2 always has: the
    outputs are exactly the same. A model whose tokenizer is not GPT-2 BPE (char-level, cl100k_base, ...) gets
    weights and config only; ngpt_meta.json keeps its tokenizer metadata for `load_hf_gpt2`.
    Returns the folder.
    """
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} is a file; the export destination must be a folder")
    cfg = model.config
    check_exportable(cfg)
    transformers = _import_transformers()
    if meta is None:
        bpe_sized = cfg.vocab_size >= GPT2_VOCAB_SIZE
        meta = dict(GPT2_META) if bpe_sized else {"tokenizer": None, "vocab_size": cfg.vocab_size}
    bpe = meta.get("tokenizer") in GPT2_BPE_NAMES and cfg.vocab_size >= GPT2_VOCAB_SIZE
    eot = GPT2_EOT if bpe else None
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=None,
        activation_function=cfg.activation,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf_config.architectures = ["GPT2LMHeadModel"]
    with torch.device("meta"):  # no random init: every tensor is replaced below
        hf_model = transformers.GPT2LMHeadModel(hf_config)
    hf_keys = {k: v.shape for k, v in hf_model.state_dict().items()}
    state_dict = _hf_state_dict(model, hf_keys)
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    if cfg.tie_embeddings:
        hf_model.lm_head.weight = hf_model.transformer.wte.weight  # tied, saved once
    if any(t.is_meta for t in hf_model.buffers()):  # transformers 4's causal-mask buffers: build it for real
        hf_model = transformers.GPT2LMHeadModel(hf_config)
        hf_model.load_state_dict(state_dict, strict=True)
    hf_model.eval()

    dest.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": "1000GB"}  # one model.safetensors file
    if "safe_serialization" in inspect.signature(hf_model.save_pretrained).parameters:  # transformers 4
        kwargs["safe_serialization"] = True
    with _no_progress_bars(transformers):
        hf_model.save_pretrained(str(dest), **kwargs)
        (dest / NGPT_META_FILE).write_text(
            json.dumps({"format": "nanogpt-cli", "bias": bool(cfg.bias), "meta": meta}, ensure_ascii=False, indent=1)
            + "\n",
            encoding="utf-8",
        )
        if bpe:
            _write_gpt2_tokenizer(dest, cfg.block_size)
    return dest


# ---------------------------------------------------------------------------------------------
# nanoGPT checkpoints


def _ckpt_path(out_dir: str | Path) -> Path:
    path = Path(out_dir).expanduser()
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise NgptError(f"no nanoGPT checkpoint at {path}")
    return path


def read_nanogpt_checkpoint(out_dir: str | Path, mmap: bool = False) -> dict:
    """The whole nanoGPT checkpoint (`out_dir/ckpt.pt`, or the file itself), loaded with
    torch.load(weights_only=True): tensors, dicts, numbers and strings only, never other objects."""
    path = _ckpt_path(out_dir)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise NgptError(
            f"refusing to load {path}: it holds Python objects{what} beyond the tensors, dicts, numbers and "
            "strings of a nanoGPT checkpoint, and unpickling them could run arbitrary code"
        ) from None
    except RuntimeError as e:
        if mmap:  # old (non-zip) serialization cannot be memory-mapped
            return read_nanogpt_checkpoint(out_dir, mmap=False)
        raise NgptError(f"could not read {path}: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise NgptError(f"{path} is not a nanoGPT checkpoint (it needs 'model' and 'model_args')")
    return ckpt


def load_nanogpt_checkpoint(out_dir: str | Path) -> tuple[dict, dict]:
    """(model state dict, model_args) from a nanoGPT `ckpt.pt`.

    torch.compile's `_orig_mod.` prefixes are stripped and old nanoGPT's causal-mask buffers
    (`attn.bias`) dropped; model_args keeps the GPTConfig fields (n_layer, n_head, n_embd,
    block_size, bias, vocab_size, dropout) and nanoGPT's exact GELU.
    """
    ckpt = read_nanogpt_checkpoint(out_dir)
    prefix = "_orig_mod."
    state_dict = {}
    for k, v in ckpt["model"].items():
        while k.startswith(prefix):
            k = k[len(prefix):]
        if k.endswith((".attn.bias", ".attn.masked_bias")) and not k.endswith("c_attn.bias"):
            continue  # the causal mask of nanoGPT without flash attention, not a weight
        state_dict[k] = v
    fields = GPTConfig.__dataclass_fields__
    model_args = {k: v for k, v in dict(ckpt["model_args"]).items() if k in fields}
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if model_args.get(k) is None]
    if missing:
        raise NgptError(f"the nanoGPT checkpoint's model_args lack {', '.join(missing)}")
    model_args.setdefault("activation", "gelu")  # nanoGPT's nn.GELU(): exact
    return state_dict, model_args


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Plain dicts, lists, ints and strs need no globals; anything else is refused unexecuted."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id")


def read_nanogpt_meta_pkl(path: str | Path) -> dict:
    """nanoGPT's char-level `meta.pkl` ({'vocab_size', 'itos', 'stoi'}) as ngpt metadata:
    {"tokenizer": "char", "vocab_size": V, "itos": [characters in id order]}.
    Read without unpickling objects: a pickle that names any class or function is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _NoGlobalsUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise NgptError(
            f"refusing to read {path}: it holds Python objects ({e}), not the plain dict of a nanoGPT meta.pkl"
        ) from None
    except (OSError, EOFError, ValueError) as e:
        raise NgptError(f"could not read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("itos"), dict):
        raise NgptError(f"{path} is not a nanoGPT char-level meta.pkl (it needs an 'itos' dict)")
    itos = data["itos"]
    vocab_size = data.get("vocab_size", len(itos))
    if sorted(itos) != list(range(len(itos))) or vocab_size != len(itos):
        raise NgptError(f"{path}: 'itos' does not map ids 0..{vocab_size - 1}")
    chars = [itos[i] for i in range(len(itos))]
    if not all(isinstance(c, str) for c in chars):
        raise NgptError(f"{path}: 'itos' values must be strings")
    return {"tokenizer": "char", "vocab_size": len(chars), "itos": chars}


def find_nanogpt_meta(out_dir: str | Path, ckpt_config: dict | None = None) -> dict:
    """The tokenizer of a nanoGPT checkpoint: its dataset's meta.pkl (char-level) if found,
    else GPT-2 BPE, as nanoGPT's sample.py assumes.

    Looks for meta.pkl next to the checkpoint, then `<out_dir>/../data/<dataset>/meta.pkl` and
    `./data/<dataset>/meta.pkl`, with <dataset> from the checkpoint's config (read from the
    checkpoint when `ckpt_config` is None).
    """
    path = Path(out_dir).expanduser()
    folder = path if path.is_dir() else path.parent
    if ckpt_config is None:
        ckpt_config = read_nanogpt_checkpoint(path, mmap=True).get("config") or {}
    candidates = [folder / "meta.pkl"]
    dataset = ckpt_config.get("dataset") if isinstance(ckpt_config, dict) else None
    if isinstance(dataset, str) and dataset:
        candidates += [folder.parent / "data" / dataset / "meta.pkl", Path("data") / dataset / "meta.pkl"]
    for candidate in candidates:
        if candidate.is_file():
            return read_nanogpt_meta_pkl(candidate)
    return dict(GPT2_META)
