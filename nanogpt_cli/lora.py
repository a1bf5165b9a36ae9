"""LoRA: low-rank adapters on a frozen model (attach, merge), the run's small checkpoint, and the PEFT folder.

    ngpt finetune --init_from=gpt2 --dataset=shakespeare --lora_rank=8 --out_dir=out/lora
    ngpt sample --out_dir=out/lora          # the base rebuilt, the adapters merged into it

`peft` (the `lora` extra) wraps ngpt's own nn.Linear layers by name (attn.c_attn, attn.c_proj, mlp.c_fc,
mlp.c_proj): each computes W x + (alpha / r) B A x with W frozen, A (r, in) random and B (out, r) zero, so a
fresh adapter changes nothing. A LoRA run's checkpoint holds the adapters only (and their optimizer state),
with a reference to the base: what init_from named and a fingerprint of its weights, checked whenever the run
is rebuilt. Beside it, adapter/ holds the same adapter in PEFT's format for transformers' GPT2LMHeadModel.
GPT-2's Conv1D layers store W transposed, (in, out), but A and B are the same matrices for either layer: peft
(fan_in_fan_out=True) transposes only the merged update B A, so the tensors are saved as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nanogpt_cli.atomic import remove_stale_temps, temp_sibling
from nanogpt_cli.config import lora_modules, lora_target_names
from nanogpt_cli.errors import NgptError, UsageError, one_line
from nanogpt_cli.model import GPT

ADAPTER_NAME = "default"  # peft's name for the one adapter a model holds
ADAPTER_DIR = "adapter"  # the PEFT-format folder in a LoRA run's out_dir
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # what a resumed run cannot change
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the model's own module names


def import_peft():
    try:
        import peft
    except ImportError:
        raise NgptError("LoRA needs peft, which is not installed; pip install 'nanogpt-cli[lora]'") from None
    return peft


def settings(cfg) -> dict:
    """The adapters a TrainConfig asks for: the "lora" entry of its checkpoint, without the base."""
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "targets": lora_target_names(cfg.lora_targets)}


def attach(model: GPT, spec: dict) -> GPT:
    """Wrap the targeted layers of `model` in LoRA layers (in place) and freeze everything but the adapters."""
    peft = import_peft()
    modules = lora_modules(spec["targets"])
    widths = [min(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in modules))]
    if spec["rank"] > min(widths):
        raise UsageError(f"--lora_rank={spec['rank']} is larger than the adapted layers allow: at most "
                         f"{min(widths)} (the model's n_embd); 4 to 64 is usual")
    config = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                             target_modules=modules, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return model


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_attached(model: torch.nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def adapter_state_dict(state: dict) -> dict:
    """The adapters' tensors of a model's state dict, named as PEFT names them (without the adapter's name):
    transformer.h.0.attn.c_attn.lora_A.weight, (rank, in); ...lora_B.weight, (out, rank)."""
    return {name.replace(f".{ADAPTER_NAME}.", "."): t for name, t in state.items() if is_adapter(name)}


def load_adapters(model: GPT, adapters: dict, source: str) -> None:
    """Set the adapters of an attached model from `adapter_state_dict`'s form."""
    own = {name.replace(f".{ADAPTER_NAME}.", "."): name for name in model.state_dict() if is_adapter(name)}
    missing, unexpected = sorted(set(own) - set(adapters)), sorted(set(adapters) - set(own))
    if missing or unexpected:
        raise NgptError(f"the adapters in {source} do not fit their model: missing {missing[:2]}, unexpected "
                        f"{unexpected[:2]}")
    try:
        model.load_state_dict({own[name]: t for name, t in adapters.items()}, strict=False)
    except RuntimeError as e:
        raise NgptError(f"the adapters in {source} do not fit their model: {one_line(e, 200)}") from None


def merge(model: GPT) -> GPT:
    """Fold each adapter into its layer (W += alpha / r * B A) and put the plain layer back: a plain GPT again,
    every parameter trainable, which sample, eval and export take like any model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    vars(model).pop("peft_config", None)  # what peft's injection set on the model
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def hold_frozen_in_bfloat16(model: GPT) -> int:
    """Store the frozen matrices of the blocks' linear layers in bfloat16 for a run that computes under bfloat16
    autocast, which casts them to bfloat16 at every forward anyway: half their memory, and no casts. The
    embeddings (and the output layer tied to them) stay float32, so the residual stream keeps its precision.
    Returns the parameters now held in bfloat16."""
    held = 0
    for module in model.transformer.h.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            held += module.weight.numel()
    return held


def describe(model: GPT, spec: dict, held_in_bfloat16: int = 0) -> str:
    """The line a LoRA run prints at its start: what trains, out of how much."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = f", {held_in_bfloat16:,} of its weights held in bfloat16" if held_in_bfloat16 else ""
    return (f"[bold]LoRA[/bold] rank {spec['rank']} (alpha {spec['alpha']:g}, dropout {spec['dropout']:g}) on "
            f"{','.join(spec['targets'])}: {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / total:.2f}%); the base is frozen{held}")


# ---------------------------------------------------------------- the base a run adapts

def fingerprint(model: GPT) -> str:
    """sha256 of the model's weights: over each tensor's name, dtype, shape and bytes, in name order. Tensors
    are hashed in parallel threads (hashlib releases the GIL), a tensor shared by two names once."""
    state = model.state_dict()
    names = sorted(state)
    storages = {}  # (data pointer, dtype, shape) -> the first name that holds it
    for name in names:
        t = state[name]
        storages.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), name)

    def digest(name: str) -> str:
        data = state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        return hashlib.sha256(memoryview(data)).hexdigest()

    unique = sorted(set(storages.values()))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = dict(zip(unique, pool.map(digest, unique), strict=True))
    total = hashlib.sha256()
    for name in names:
        t = state[name]
        first = storages[(t.data_ptr(), t.dtype, tuple(t.shape))]
        total.update(f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)} {digests[first]}\n".encode())
    return f"sha256:{total.hexdigest()}"


def base_reference(init_from: str, out_dir: str, model: GPT) -> dict:
    """What rebuilds the base of a LoRA run: `init_from` as named, where it is (a local path made absolute, so
    that the run works from any folder), and the fingerprint of its weights as loaded."""
    from nanogpt_cli.checkpoint import CKPT_NAME, checkpoint_file

    path = Path(init_from).expanduser()
    local = path.exists()
    if local and checkpoint_file(path).resolve() == (Path(out_dir).expanduser() / CKPT_NAME).resolve():
        raise UsageError(f"--out_dir={out_dir} holds the base, --init_from={init_from}: a LoRA run's checkpoint "
                         "would replace the weights its adapters refer to; choose another --out_dir")
    return {"init_from": init_from, "source": str(path.resolve()) if local else init_from,
            "fingerprint": fingerprint(model)}


def load_base(base: dict, source: str, dropout: float | None) -> GPT:
    """The base a LoRA run adapts, as its checkpoint `source` refers to it; refused when missing or changed."""
    from nanogpt_cli.checkpoint import checkpoint_file, load_model

    where, named = base["source"], base["init_from"]
    if Path(where).is_absolute() and not Path(where).exists():
        raise NgptError(f"{source} is a LoRA run whose base {named!r} is missing: {where} does not exist; put the "
                        "base back there to resume, sample or export the run")
    if Path(where).is_absolute() and checkpoint_file(where).resolve() == Path(source).resolve():
        raise NgptError(f"{source} is damaged: the LoRA run names itself as its base")
    try:
        model, _, _ = load_model(where, where, dropout=dropout)
    except NgptError as e:
        raise NgptError(f"the base of the LoRA run {source}, {named!r}: {e}", exit_code=e.exit_code) from None
    now = fingerprint(model)
    if now != base["fingerprint"]:
        raise UsageError(f"the base of the LoRA run {source} has changed: {named!r} now holds other weights than "
                         f"its adapters were trained on ({now[:19]}, was {base['fingerprint'][:19]}); restore that "
                         "base, or finetune again from this one")
    return model


def model_from_checkpoint(ckpt: dict, source: str, dropout: float | None = None, merged: bool = True) -> GPT:
    """A LoRA run's model: its base rebuilt (and checked), cropped to the run's context, its adapters loaded;
    merged into the base for inference, or left apart (`merged=False`) to train on."""
    spec = ckpt["lora"]
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), dict) or not {"rank", "alpha", "dropout",
                                                                                   "targets"} <= set(spec):
        raise NgptError(f"{source} is damaged: its 'lora' entry lacks the adapters' settings or their base")
    args = ckpt["model_args"]
    model = load_base(spec["base"], source, args.get("dropout") if dropout is None else dropout)
    block_size = args.get("block_size", model.config.block_size)
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    attach(model, spec)
    load_adapters(model, ckpt["model"], source)
    return merge(model) if merged else model


# ---------------------------------------------------------------- the PEFT folder

def peft_config(spec: dict) -> dict:
    """adapter_config.json: the adapter as peft describes it for transformers' GPT-2, whose Conv1D layers
    (fan_in_fan_out) have the module names ngpt's Linear layers have."""
    peft = import_peft()
    config = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                             target_modules=lora_modules(spec["targets"]), fan_in_fan_out=True, bias="none",
                             task_type="CAUSAL_LM", base_model_name_or_path=spec["base"]["source"])
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}


def write_adapter_folder(folder: Path, adapters: dict, spec: dict) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into `folder`, each file whole or not at all,
    for `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), folder)`."""
    from safetensors.torch import save

    files = {"adapter_model.safetensors": save({PEFT_PREFIX + name: t.detach().cpu().contiguous()
                                                for name, t in adapters.items()}, metadata={"format": "pt"}),
             "adapter_config.json": (json.dumps(peft_config(spec), indent=2, sort_keys=True) + "\n").encode()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            tmp = temp_sibling(folder / name)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, folder / name)
            finally:
                tmp.unlink(missing_ok=True)
            remove_stale_temps(folder / name)
    except OSError as e:
        raise NgptError(f"could not write the adapter folder {folder}: {e.strerror or e}") from None
    return folder
