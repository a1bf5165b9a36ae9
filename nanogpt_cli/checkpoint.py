"""Checkpoints: atomic save, safe load, and building a model from whatever `init_from` names.

A checkpoint is one `ckpt.pt` holding plain data only (tensors, numbers, strings, lists,
dicts), so it loads with `torch.load(weights_only=True)`: model and optimizer state, the
model's shape (`model_args`), the resolved config, the tokenizer metadata, iteration, best
val loss, every RNG state and the data loader's state.

karpathy/nanoGPT's `ckpt.pt` loads the same way (its compiled model's `_orig_mod.` prefixes and
old causal-mask buffers are dropped); its tokenizer comes from the dataset's `meta.pkl`, read
without unpickling objects (`read_nanogpt_meta_pkl`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from nanogpt_cli.atomic import new_file, remove_stale_temps, temp_sibling
from nanogpt_cli.errors import NgptError, UnknownInitFrom, UsageError, one_line
from nanogpt_cli.limits import check_model_fits
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.tokenizer import GPT2_META

CKPT_NAME = "ckpt.pt"
FORMAT = "ngpt/1"


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any moment leaves either the old checkpoint or the new one, never half of one.
    A failed write (full disk, I/O error) removes the temporary file and leaves the old checkpoint as it was."""
    path = Path(path)
    tmp = temp_sibling(path)  # unguessable, and created exclusively: a planted link is never written through
    try:
        with new_file(tmp) as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save's writer reports a full disk as a RuntimeError
            kept = "the previous checkpoint is intact" if path.is_file() else "no checkpoint was written"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e, 200)
            raise NgptError(f"could not save the checkpoint {path}: {reason}; {kept}") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    remove_stale_temps(path)


def checkpoint_file(location: str | os.PathLike) -> Path:
    """An out_dir (holding ckpt.pt) or a checkpoint file -> the file."""
    path = Path(location).expanduser()
    if path.is_file():
        return path
    return path / CKPT_NAME if path.is_dir() or not path.suffix else path


def peek_iteration(location: str | os.PathLike) -> int | str:
    """The iteration a checkpoint was saved at, read without loading its tensors ("?" when unreadable)."""
    path = checkpoint_file(location)
    try:
        return int(_torch_load(path, mmap=True)["iter_num"])
    except Exception:
        return "?"


def load_checkpoint(location: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint safely (no arbitrary unpickling); clear errors for missing or corrupt files. mmap maps
    the file's tensors instead of reading them (see `_torch_load`)."""
    path = checkpoint_file(location)
    if not path.is_file():
        if (path.parent / "config.json").is_file():
            raise UsageError(f"{path.parent} is a Hugging Face model folder, not an ngpt run: load it with "
                             f"--init_from={path.parent}")
        raise UsageError(f"no checkpoint at {path}; train one first (`ngpt train ... --out_dir={path.parent}`)")
    try:
        ckpt = _torch_load(path, mmap)
    except Exception as e:
        raise NgptError(f"checkpoint {path} is corrupt or not a checkpoint ({torch_load_failure(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise NgptError(f"{path} is not an ngpt or nanoGPT checkpoint (no 'model' and 'model_args')")
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise NgptError(f"{path} is damaged: 'model' must map names to tensors and 'model_args' must be a table")
    # Saved from a compiled or DDP-wrapped model (nanoGPT does): strip the wrappers' prefixes; drop the
    # causal-mask buffers of old nanoGPT versions, which are not weights.
    ckpt["model"] = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()
                     if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return ckpt


def _torch_load(path: Path, mmap: bool):
    """torch.load(weights_only=True); with mmap the file's tensors are mapped, not copied, into memory: a
    124M-parameter checkpoint then loads in milliseconds from the page cache instead of being read into fresh memory
    (the mapping is private: writes to the tensors never reach the file). A mapped file must not be rewritten in
    place while its tensors live (the process would die of SIGBUS): ngpt replaces checkpoints by renaming, so this
    is for inference, where nothing saves over the file it read. Files of torch's legacy format cannot be mapped
    and are read whole."""
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def torch_load_failure(e: Exception) -> str:
    """Why torch.load refused a file, in a few words. torch's weights_only refusal advises loading
    with weights_only=False (which would run code from the file): keep only its reason. Used for ngpt's
    checkpoints and for a Hugging Face folder's pytorch_model.bin alike."""
    text = str(e)
    if "Weights only load failed" in text:
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", text)
        reason = match.group(1) if match else "not plain tensors and data"
        return (f"it holds something other than tensors and plain data: {reason.strip()}; ngpt loads "
                "checkpoints with weights_only=True and never runs code from them")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text) if "\x1b" in text else text
    return f"{type(e).__name__}: {one_line(text, 200)}"


def load_state_checked(model: torch.nn.Module, state_dict: dict, source: str, assign: bool = False) -> None:
    """load_state_dict, but a mismatch says which keys and shapes differ. With assign the model's tensors become
    the state dict's (a model built on the meta device takes the checkpoint's tensors without a copy), in the
    model's dtypes, and parameters the model shares (tied embeddings) stay one parameter."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if shapes:
        problems.append(f"shape of {'; '.join(shapes[:3])}")
    if problems:
        raise NgptError(f"{source} does not fit the model: {'; '.join(problems)}")
    if not assign:
        model.load_state_dict(state_dict)
        return
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, assign=True)
    for names in shared.values():  # a plain load copies each name into the shared parameter: the last one wins
        kept = model.get_parameter(names[-1])
        for name in names[:-1]:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, kept)


INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_", "kaiming_uniform_",
                  "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def _weights_left_unset():
    """Build modules on the meta device with torch.nn.init's functions doing nothing: the checkpoint's tensors
    replace every weight, so their random initialisation (seconds at 124M, and on the meta device an import of
    torch._dynamo) would be thrown away."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def model_from_checkpoint(ckpt: dict, source: str, dropout: float | None = None, merged: bool = True) -> GPT:
    """The checkpoint's model. A LoRA run's holds adapters: its base is rebuilt under them (lora.py), which are
    merged into it unless `merged` is False (to train on)."""
    if "lora" in ckpt:
        from nanogpt_cli import lora

        return lora.model_from_checkpoint(ckpt, source, dropout, merged)
    known = GPTConfig.__dataclass_fields__
    args = {k: v for k, v in ckpt["model_args"].items() if k in known}
    # Saved without it: nanoGPT's own checkpoints (no "format") used the exact GELU; ngpt's earliest, GPT-2's.
    args.setdefault("activation", "gelu_new" if "format" in ckpt else "gelu")
    if dropout is not None:
        args["dropout"] = dropout
    try:
        config = GPTConfig(**args)
        check_model_fits(int(config.n_layer), int(config.n_embd), int(config.vocab_size), int(config.block_size),
                         source)
        with _weights_left_unset():
            model = GPT(config)
    except (AssertionError, TypeError, ValueError) as e:
        raise NgptError(f"{source} has invalid model_args {ckpt['model_args']}: {e}") from None
    load_state_checked(model, ckpt["model"], source, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor the checkpoint does not hold
        model = GPT(config)
        load_state_checked(model, ckpt["model"], source)
    return model


def checkpoint_meta(ckpt: dict, location: str | os.PathLike) -> dict:
    """The tokenizer metadata of a checkpoint: stored in ngpt's; found beside nanoGPT's."""
    if "meta" in ckpt:
        return ckpt["meta"]
    return find_nanogpt_meta(checkpoint_file(location).parent, ckpt.get("config"))


def load_model(init_from: str, out_dir: str, dropout: float | None = None,
               mmap: bool = False) -> tuple[GPT, dict, dict | None]:
    """(model, tokenizer meta, checkpoint or None) for `init_from`:
    resume (out_dir's checkpoint), a checkpoint path or out_dir, gpt2*, or a Hugging Face folder/hub id. mmap: an
    ngpt checkpoint's tensors are mapped from the file (for inference, see `_torch_load`)."""
    if init_from == "resume":
        location = out_dir
    elif Path(init_from).expanduser().exists() and not (Path(init_from).expanduser() / "config.json").is_file():
        location = init_from
    else:
        location = None
    if location is not None:
        ckpt = load_checkpoint(location, mmap)
        model = model_from_checkpoint(ckpt, str(checkpoint_file(location)), dropout)
        return model, checkpoint_meta(ckpt, location), ckpt
    if init_from == "scratch":
        raise UsageError("init_from=scratch has no weights to load; use resume, a checkpoint, or gpt2*")
    from nanogpt_cli import hf

    if not hf.is_hf_source(init_from):
        raise UnknownInitFrom(f"unknown init_from {init_from!r}: use scratch, resume, gpt2, gpt2-medium, "
                              "gpt2-large, gpt2-xl, a checkpoint path, or a Hugging Face folder or hub id")
    model, meta = hf.load_hf_gpt2(init_from, dropout=dropout)
    return model, meta, None


# ---------------------------------------------------------------- nanoGPT's meta.pkl

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


def find_nanogpt_meta(folder: Path, ckpt_config: dict | None) -> dict:
    """The tokenizer of the nanoGPT checkpoint in `folder`: its dataset's meta.pkl (char-level) if
    found, else GPT-2 BPE, as nanoGPT's sample.py assumes.

    Looks for meta.pkl next to the checkpoint, then `<folder>/../data/<dataset>/meta.pkl` and
    `./data/<dataset>/meta.pkl`, with <dataset> from the checkpoint's config.
    """
    candidates = [folder / "meta.pkl"]
    dataset = ckpt_config.get("dataset") if isinstance(ckpt_config, dict) else None
    if isinstance(dataset, str) and dataset:
        candidates += [folder.parent / "data" / dataset / "meta.pkl", Path("data") / dataset / "meta.pkl"]
    for candidate in candidates:
        if candidate.is_file():
            return read_nanogpt_meta_pkl(candidate)
    return dict(GPT2_META)


# ---------------------------------------------------------------- RNG state for exact resume

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():  # dropout on mps draws from the mps generator
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
