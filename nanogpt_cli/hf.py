"""GPT-2 weights in and out of Hugging Face `transformers`: hub models and local folders.

* `load_hf_gpt2` turns a `GPT2LMHeadModel` (a hub name like "gpt2-medium", a hub id "owner/name",
  or a local folder with config.json) into an ngpt `GPT`, Conv1D weights transposed.
* `export_hf` writes an ngpt `GPT` as a folder that `GPT2LMHeadModel.from_pretrained` loads, with
  tokenizer files (`hf_tokenizer`) that `AutoTokenizer` loads: GPT-2's BPE, a BPE trained by ngpt, or
  a char-level vocabulary. The folder is built under a temporary name and renamed into place whole,
  replacing a previous export only when told to.

`transformers` is an optional dependency (the `hf` extra) and is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path

import torch

from nanogpt_cli import hub
from nanogpt_cli.atomic import new_file, remove_stale_temps, replace_folder, temp_folder
from nanogpt_cli.errors import NgptError, UsageError, one_line
from nanogpt_cli.hf_tokenizer import write_bpe_tokenizer, write_char_tokenizer, write_gpt2_tokenizer
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.tokenizer import GPT2_EOT, GPT2_META, GPT2_VOCAB_SIZE, from_meta

PRETRAINED = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}

# tiktoken encodings whose ranks and split pattern are exactly GPT-2's byte-level BPE
GPT2_BPE_NAMES = ("gpt2", "r50k_base")
NGPT_META_FILE = "ngpt_meta.json"  # what ngpt knows that config.json cannot say (char vocabulary, bias)

# Weights that are nn.Linear (out, in) in ngpt and Conv1D (in, out) in transformers.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
_INSTALL_HINT = "install the hf extra: pip install 'nanogpt-cli[hf]'"
_LOCAL_HINT = ("download the model elsewhere and pass its local folder: "
               "--init_from=/path/to/folder with config.json and model.safetensors")


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
    with hub.quiet_hub_logs():
        return _load_hf_gpt2(name_or_path, source, folder, transformers, dropout)


def _load_error(name_or_path: str, folder: Path | None, e: Exception, reading_config: bool) -> NgptError:
    """The one line for a failed `from_pretrained`: a config of a model_type this transformers does not
    know; a Hub that could not be reached or said no; or a local folder with unreadable files (e.g. a
    truncated model.safetensors)."""
    if reading_config and isinstance(e, (ValueError, KeyError)) and not isinstance(e, OSError):
        return UsageError(f"{name_or_path} is not a GPT-2 model: {one_line(e, 200)}")
    if folder is None:
        return hub.hub_error(name_or_path, e, _LOCAL_HINT)
    from nanogpt_cli.checkpoint import torch_load_failure

    what = "config" if reading_config else "weights"
    return NgptError(f"could not load the {what} in {name_or_path}: {torch_load_failure(e)}")


def _load_hf_gpt2(name_or_path: str, source: str, folder: Path | None, transformers, dropout: float | None):
    cached_only = folder is None and not hub.hub_reachable()  # offline: the local cache, without the Hub's retries
    hf_config = None
    try:
        hf_config = transformers.AutoConfig.from_pretrained(source, local_files_only=cached_only)
        _check_gpt2_config(hf_config, name_or_path)
        with _no_progress_bars(transformers, quiet=folder is not None):
            # shape mismatches come back in `info` (not as transformers' RuntimeError after a long report)
            hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(
                source, config=hf_config, output_loading_info=True, ignore_mismatched_sizes=True,
                local_files_only=cached_only)
    except NgptError:
        raise
    except Exception as e:
        raise _load_error(name_or_path, folder, e, reading_config=hf_config is None) from None
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


def _is_export(folder: Path) -> bool:
    """A Hugging Face model folder (config.json), such as a previous export."""
    return (folder / "config.json").is_file() or (folder / NGPT_META_FILE).is_file()


def check_export_destination(dest: Path, replace: bool) -> None:
    """Refuse a destination whose contents an export would lose: anything but a folder; a folder that
    holds files, unless `replace` (--force) and they are a previous export, which is replaced whole."""
    if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
        raise UsageError(f"{dest} exists and is not a folder; choose another DEST")
    entries = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
    if not entries:
        return
    if not replace:
        raise UsageError(f"{dest} exists and is not an empty folder; choose another DEST, or add --force to replace "
                         "the export in it")
    if not _is_export(dest):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"{dest} holds files that are not a Hugging Face export ({shown}); --force replaces only "
                         "a previous export: choose another DEST")


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


def export_hf(model: GPT, dest: str | Path, meta: dict | None = None, replace: bool = False) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder: config.json, generation_config.json,
    model.safetensors (lm_head tied to wte, unless the model unties them), ngpt_meta.json, and the tokenizer
    files: GPT-2's (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json) for GPT-2 BPE models,
    tokenizer.json and tokenizer_config.json for a trained BPE or a char-level vocabulary.

    GPT2LMHeadModel computes the GPT-2 path and, of the modern options, relu2 (its activation_function),
    an untied head (tie_word_embeddings=False) and zero-initialised projections (an init only); a model
    with rotary positions, RMSNorm, QK-norm, a norm after the embedding or soft-capped logits is refused
    (`check_exportable`). `meta` is the model's tokenizer metadata (None: GPT-2 BPE when the vocabulary
    is big enough). A bias=False model is exported with all-zero biases, which GPT-2 always has: the
    outputs are exactly the same. A model with another tokenizer (cl100k_base, ...) gets weights and
    config only; ngpt_meta.json keeps its tokenizer metadata for `load_hf_gpt2` in every case.
    The folder is built beside `dest` and renamed into place when complete, so an error or a signal
    leaves nothing half-written; `replace` lets it take the place of a previous export (see
    `check_export_destination`), whose files all go. Returns the folder.
    """
    dest = Path(dest).expanduser()
    check_export_destination(dest, replace)
    cfg = model.config
    check_exportable(cfg)
    transformers = _import_transformers()
    if meta is None:
        bpe_sized = cfg.vocab_size >= GPT2_VOCAB_SIZE
        meta = dict(GPT2_META) if bpe_sized else {"tokenizer": None, "vocab_size": cfg.vocab_size}
    kind = meta.get("tokenizer")
    gpt2_bpe = kind in GPT2_BPE_NAMES and cfg.vocab_size >= GPT2_VOCAB_SIZE
    tokenizer = from_meta(meta) if kind in ("bpe", "char") else None  # before anything is written
    eot = GPT2_EOT if gpt2_bpe else getattr(tokenizer, "eot_token", None)
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

    kwargs = {"max_shard_size": "1000GB"}  # one model.safetensors file
    if "safe_serialization" in inspect.signature(hf_model.save_pretrained).parameters:  # transformers 4
        kwargs["safe_serialization"] = True
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest)  # what killed exports left
        built = temp_folder(dest)
    except OSError as e:
        raise NgptError(f"could not write the export {dest}: {e.strerror or one_line(e)}") from None
    try:
        with _no_progress_bars(transformers):
            hf_model.save_pretrained(str(built), **kwargs)
            saved = {"format": "nanogpt-cli", "bias": bool(cfg.bias), "meta": meta}
            with new_file(built / NGPT_META_FILE) as f:
                f.write((json.dumps(saved, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
            if gpt2_bpe:
                write_gpt2_tokenizer(built, cfg.block_size)
            elif kind == "bpe":
                write_bpe_tokenizer(built, tokenizer, cfg.block_size)
            elif kind == "char":
                write_char_tokenizer(built, tokenizer, cfg.block_size)
        replace_folder(built, dest)
    except OSError as e:  # the disk (full, read-only): nothing is left half-written
        raise NgptError(f"could not write the export {dest}: {e.strerror or one_line(e)}; "
                        "nothing was changed") from None
    finally:  # an error, Ctrl-C or SIGTERM: the half-built folder goes
        shutil.rmtree(built, ignore_errors=True)
    return dest
