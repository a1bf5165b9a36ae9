"""Typed configuration: dataclasses whose fields carry their help, presets, overrides.

One flow for every command: dataclass defaults < preset (`--preset NAME|PATH.toml`) <
command line (`--key=value`, `--key value`, dashes or underscores, `--no-flag`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from nanogpt_cli.errors import UsageError

if TYPE_CHECKING:
    from nanogpt_cli.model import GPTConfig


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where prepared datasets live: the argument, else $NGPT_DATA_DIR, else a per-user data folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("NGPT_DATA_DIR"):
        return Path(os.environ["NGPT_DATA_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("ngpt")) / "data"


def cache_dir() -> Path:
    """Downloads (corpora, benchmark files) are cached here; $NGPT_CACHE_DIR overrides."""
    if os.environ.get("NGPT_CACHE_DIR"):
        return Path(os.environ["NGPT_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("ngpt"))


def opt(default, help: str, panel: str = "Options", choices: tuple | None = None):
    """A config field with its help text (shown by `--help` and `ngpt presets show`)."""
    return field(default=default, metadata={"help": help, "panel": panel, "choices": choices})


AUTO = None  # fields typed `X | None` read "auto" as None: the engine chooses for the device


@dataclass
class TrainConfig:
    """Everything a training (or finetuning, or evaluation) run needs; keys are nanoGPT's."""

    # I/O
    preset: str | None = opt(None, "the preset these keys started from (set by --preset; kept in checkpoints)", "I/O")
    out_dir: str = opt("out", "folder for checkpoints, metrics.jsonl and config.toml", "I/O")
    init_from: str = opt("scratch", "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hugging Face "
                         "folder or hub id | an ngpt out_dir or checkpoint file", "I/O")
    eval_interval: int = opt(2000, "evaluate train/val loss every this many iterations", "I/O")
    log_interval: int = opt(1, "log loss, lr and speed every this many iterations", "I/O")
    eval_iters: int = opt(200, "batches per split in each evaluation", "I/O")
    eval_only: bool = opt(False, "evaluate once and exit", "I/O")
    always_save_checkpoint: bool = opt(True, "save at every eval, not only when val loss improves", "I/O")
    on_nonfinite: str = opt("stop", "on a NaN/inf loss: stop (keep the last good checkpoint) or skip the step",
                            "I/O", ("stop", "skip"))
    # logging
    wandb_log: bool = opt(False, "log to Weights & Biases (pip install 'nanogpt-cli[wandb]')", "Logging")
    wandb_project: str = opt("owt", "wandb project", "Logging")
    wandb_run_name: str = opt("gpt2", "wandb run name", "Logging")
    # data
    dataset: str = opt("openwebtext", "prepared dataset name (a folder under data_dir), or 'synthetic'", "Data")
    data_dir: str | None = opt(None, "where prepared datasets live (default: $NGPT_DATA_DIR or a per-user folder)",
                               "Data")
    gradient_accumulation_steps: int = opt(40, "micro-steps per optimizer step, across all processes", "Data")
    batch_size: int = opt(12, "sequences per micro-step per process", "Data")
    block_size: int | None = opt(AUTO, "context length in tokens (auto: 1024 from scratch, the model's own when "
                                 "resuming or finetuning)", "Data")
    # model
    n_layer: int = opt(12, "transformer blocks", "Model")
    n_head: int = opt(12, "attention heads per block", "Model")
    n_embd: int = opt(768, "embedding width (divisible by n_head)", "Model")
    dropout: float = opt(0.0, "dropout rate (0 for pretraining, 0.1+ for finetuning)", "Model")
    bias: bool = opt(False, "bias in Linear and LayerNorm layers (GPT-2 has them)", "Model")
    vocab_size: int | None = opt(None, "vocabulary size (auto: the dataset's, padded to a multiple of 64 for BPE)",
                                 "Model")
    activation: str = opt("gelu", "MLP activation: gelu (exact, nanoGPT's), gelu_new (tanh, OpenAI's GPT-2) or relu2 "
                          "(ReLU squared, modded-nanogpt's)", "Model", ("gelu", "gelu_new", "relu2"))
    position: str = opt("learned", "positions: learned (GPT-2's table) or rope (rotary embeddings)", "Model",
                        ("learned", "rope"))
    rope_base: float = opt(10000.0, "rotary base (position=rope): larger turns the slow channels more slowly",
                           "Model")
    norm: str = opt("layernorm", "normalisation: layernorm (GPT-2's) or rmsnorm", "Model", ("layernorm", "rmsnorm"))
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head before attention", "Model")
    embedding_norm: bool = opt(False, "normalise the embedding before the first block", "Model")
    tie_embeddings: bool = opt(True, "the token embedding is the output head (GPT-2); --no-tie_embeddings unties "
                               "them", "Model")
    logit_softcap: float | None = opt(None, "cap the logits smoothly: cap * tanh(logits / cap) (none: off)", "Model")
    zero_init_proj: bool = opt(False, "start attention's and the MLP's output projections at zero", "Model")
    # LoRA
    lora_rank: int = opt(0, "train rank-R low-rank adapters (LoRA) on frozen pretrained weights instead of the "
                         "weights themselves; 0: off (needs the lora extra: pip install 'nanogpt-cli[lora]')", "LoRA")
    lora_alpha: float = opt(16.0, "LoRA scale: the adapters' update is multiplied by lora_alpha / lora_rank", "LoRA")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input", "LoRA")
    lora_targets: str = opt("attn,proj,mlp", "the layers that get adapters, a comma list of attn (attention's "
                            "q,k,v projection), proj (attention's output projection), mlp (both MLP layers)", "LoRA")
    # optimizer
    optimizer: str = opt("adamw", "adamw, or muon: Muon for the blocks' matrices, AdamW for the rest", "Optimizer",
                         ("adamw", "muon"))
    learning_rate: float = opt(6e-4, "peak learning rate (AdamW's; under muon, the schedule every group follows)",
                               "Optimizer")
    max_iters: int = opt(600000, "total optimizer steps", "Optimizer")
    weight_decay: float = opt(1e-1, "AdamW weight decay (matrices only)", "Optimizer")
    beta1: float = opt(0.9, "AdamW beta1", "Optimizer")
    beta2: float = opt(0.95, "AdamW beta2", "Optimizer")
    grad_clip: float = opt(1.0, "clip gradients at this norm (0 disables)", "Optimizer")
    decay_lr: bool = opt(True, "cosine learning-rate decay after warmup", "Optimizer")
    warmup_iters: int = opt(2000, "linear warmup steps", "Optimizer")
    lr_decay_iters: int = opt(600000, "steps until the learning rate reaches min_lr (about max_iters)", "Optimizer")
    min_lr: float = opt(6e-5, "final learning rate (about learning_rate / 10)", "Optimizer")
    lr_schedule: str = opt("cosine", "after warmup: cosine decay to min_lr, or wsd (constant, then a linear "
                           "cool-down to min_lr over the last cooldown_frac of lr_decay_iters)", "Optimizer",
                           ("cosine", "wsd"))
    cooldown_frac: float = opt(0.4, "wsd: the fraction of lr_decay_iters spent cooling down", "Optimizer")
    muon_lr: float = opt(0.02, "muon: peak learning rate of the blocks' matrices", "Optimizer")
    muon_momentum: float = opt(0.95, "muon: momentum", "Optimizer")
    muon_nesterov: bool = opt(True, "muon: Nesterov momentum", "Optimizer")
    muon_ns_steps: int = opt(5, "muon: Newton-Schulz iterations per step", "Optimizer")
    embedding_lr: float | None = opt(None, "muon: AdamW's peak rate for the embeddings (auto: learning_rate)",
                                     "Optimizer")
    head_lr: float | None = opt(None, "muon: AdamW's peak rate for the output head, and a tied embedding (auto: "
                                "learning_rate)", "Optimizer")
    scalar_lr: float | None = opt(None, "muon: AdamW's peak rate for norm gains and biases (auto: learning_rate)",
                                  "Optimizer")
    # system
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps", "System")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast precision)", "System",
                     ("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = opt(AUTO, "torch.compile the model (auto: on for cuda)", "System")
    seed: int = opt(1337, "random seed (each process adds its rank)", "System")
    backend: str = opt("auto", "torch.distributed backend: auto (nccl on cuda, gloo on cpu) | nccl | gloo", "System",
                       ("auto", "nccl", "gloo"))
    strategy: str = opt("ddp", "multi-process strategy: ddp, or fsdp to shard parameters and optimizer state",
                        "System", ("ddp", "fsdp"))

    def validate(self) -> TrainConfig:
        positive = ("batch_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                    "eval_interval", "log_interval", "eval_iters")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size <= 0:
            raise UsageError(f"--block_size must be positive, got {self.block_size}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr",
                     "learning_rate"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must not be negative, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UsageError(f"--n_embd ({self.n_embd}) must be divisible by --n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UsageError("--beta1 and --beta2 must be in [0, 1)")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise UsageError(f"--vocab_size must be positive, got {self.vocab_size}")
        if self.backend == "nccl" and self.device == "cpu":
            raise UsageError("--backend=nccl needs CUDA GPUs; on --device=cpu use gloo (or auto)")
        self.validate_recipe()
        validate_text(self, ("out_dir", "init_from", "dataset"))
        validate_lora(self)
        validate_seed(self.seed)
        validate_device_name(self.device)
        return self

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The architecture of a model trained from scratch with these keys."""
        from nanogpt_cli.model import GPTConfig

        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         block_size=SCRATCH_BLOCK_SIZE if self.block_size is None else self.block_size,
                         bias=self.bias, dropout=self.dropout, vocab_size=vocab_size, activation=self.activation,
                         position=self.position, rope_base=self.rope_base, norm=self.norm, qk_norm=self.qk_norm,
                         embedding_norm=self.embedding_norm, tie_embeddings=self.tie_embeddings,
                         logit_softcap=self.logit_softcap, zero_init_proj=self.zero_init_proj)


    def validate_recipe(self) -> None:
        """The model options and the optimizer keys: values the model or the optimizer cannot take, and
        combinations that cannot work."""
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise UsageError(f"--position=rope rotates pairs of channels: the head size n_embd / n_head = "
                             f"{self.n_embd // self.n_head} must be even")
        if self.rope_base <= 0:
            raise UsageError(f"--rope_base must be positive, got {self.rope_base}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise UsageError(f"--logit_softcap must be positive (or none to turn it off), got {self.logit_softcap}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise UsageError(f"--cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        for name in ("muon_lr", "embedding_lr", "head_lr", "scalar_lr"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UsageError(f"--{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise UsageError(f"--muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 1 <= self.muon_ns_steps < 100:
            raise UsageError(f"--muon_ns_steps must be between 1 and 99, got {self.muon_ns_steps}")
        if self.optimizer == "muon" and self.strategy == "fsdp":
            raise UsageError("--optimizer=muon cannot run with --strategy=fsdp: Muon orthogonalises whole matrices, "
                             "which FSDP shards across the processes; use --strategy=ddp")
        if self.optimizer == "muon" and self.learning_rate <= 0:
            raise UsageError("--optimizer=muon scales every group's rate by the schedule of --learning_rate, which "
                             f"must be positive, got {self.learning_rate}")


SCRATCH_BLOCK_SIZE = 1024  # a new model's context when block_size is auto: GPT-2's

# `ngpt finetune` without a preset: a short run at a small, constant learning rate (nanoGPT's finetuning recipe,
# config/finetune_shakespeare.py, scaled to a laptop), instead of pretraining's 2000-step warmup and 600,000-step decay.
FINETUNE_DEFAULTS = {"learning_rate": 3e-5, "decay_lr": False, "warmup_iters": 0, "max_iters": 200,
                     "eval_interval": 50, "eval_iters": 20, "batch_size": 4, "gradient_accumulation_steps": 4}

# The TrainConfig keys that `ngpt eval` reads (its --help lists these; the others are accepted, so that a
# training preset works, and change nothing).
EVAL_KEYS = ("out_dir", "init_from", "dataset", "data_dir", "batch_size", "block_size", "eval_iters", "seed",
             "device", "dtype")


def validate_text(cfg, names: tuple[str, ...]) -> None:
    """Keys naming a folder, file or model cannot be empty (`--out_dir=` would otherwise mean the current folder)."""
    for name in names:
        if not str(getattr(cfg, name)).strip():
            raise UsageError(f"--{name} is empty; give a value or leave --{name} out for its default")


# --lora_targets names -> the linear layers (module names in ngpt's GPT and in transformers' GPT-2) they adapt
LORA_TARGETS = {"attn": ("attn.c_attn",), "proj": ("attn.c_proj",), "mlp": ("mlp.c_fc", "mlp.c_proj")}


def lora_target_names(text: str) -> list[str]:
    """--lora_targets (a comma list of LORA_TARGETS names) -> the names, each once, in the order given."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise UsageError(f"--lora_targets is empty; name some of {', '.join(LORA_TARGETS)}")
    for name in names:
        if name not in LORA_TARGETS:
            close = difflib.get_close_matches(name, list(LORA_TARGETS), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(f"unknown --lora_targets name {name!r}; {hint}use a comma list of attn (attention's "
                             "q,k,v projection), proj (attention's output projection), mlp (both MLP layers)")
    return names


def lora_modules(names: list[str]) -> list[str]:
    """The module names that LORA_TARGETS names stand for."""
    return [module for name in names for module in LORA_TARGETS[name]]


def validate_lora(cfg: TrainConfig) -> None:
    if cfg.lora_rank < 0:
        raise UsageError(f"--lora_rank must be positive (or 0: no adapters), got {cfg.lora_rank}")
    if cfg.lora_alpha <= 0:
        raise UsageError(f"--lora_alpha must be positive, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    lora_target_names(cfg.lora_targets)


SEED_LIMIT = 2**62  # torch takes 64-bit seeds; each rank and evaluation adds a little to this one


def validate_seed(seed: int) -> None:
    if not -SEED_LIMIT <= seed <= SEED_LIMIT:
        raise UsageError(f"--seed must be between -2**62 and 2**62, got {seed}")


def validate_device_name(device: str) -> None:
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


@dataclass
class ModelSource:
    """Where a command that runs a model for inference (sample, serve) loads it from, and on what."""

    out_dir: str = opt("out", "an ngpt out_dir (or a nanoGPT one) to load ckpt.pt from", "Model")
    init_from: str = opt("resume", "resume (the checkpoint in out_dir) | gpt2* | a Hugging Face folder or hub id",
                         "Model")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps", "System")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16", "System",
                     ("auto", "float32", "bfloat16", "float16"))
    compile: bool = opt(False, "torch.compile the model", "System")
    quantize: str = opt("none", "none | int8: weight-only int8 matrices, a scale per output channel (cpu only)",
                        "System", ("none", "int8"))


@dataclass
class SampleConfig(ModelSource):
    """Generation from a trained checkpoint or a pretrained GPT-2; keys are nanoGPT's sample.py keys."""

    # Text keys are typed `str` (default None = not given), not `str | None`: "", "none" and "auto"
    # are text here, not "unset", so `--prompt ""` is refused as empty instead of meaning the default.
    prompt: str = opt(None, "text to continue (default: a newline); '-' reads stdin", "Prompt")
    start: str = opt(None, "nanoGPT's spelling of the prompt; FILE:path reads the prompt from a file", "Prompt")
    prompt_file: str = opt(None, "read the prompt from this file (- for stdin)", "Prompt")
    num_samples: int = opt(10, "how many samples to draw (as one batch)", "Sampling")
    max_new_tokens: int = opt(500, "tokens generated per sample", "Sampling")
    temperature: float = opt(0.8, "1.0 = the model's distribution, lower = more conservative, 0 = greedy",
                             "Sampling")
    top_k: int | None = opt(200, "keep only the k most likely tokens (0 or none: all)", "Sampling")
    top_p: float | None = opt(None, "nucleus sampling: keep the smallest set of tokens with this much mass", "Sampling")
    stop: str = opt(None, "end a sample where this string first appears in its generated text (cut before it)",
                    "Sampling")
    stop_at_eot: bool = opt(True, "end a sample at <|endoftext|> (BPE models; --no-stop_at_eot to go on)",
                            "Sampling")
    use_cache: bool = opt(True, "use the KV cache (false recomputes the context each step, as nanoGPT)", "Sampling")
    seed: int = opt(1337, "random seed; the same seed gives the same samples", "Sampling")

    def validate(self) -> SampleConfig:
        if self.num_samples <= 0:
            raise UsageError(f"--num_samples must be positive, got {self.num_samples}")
        if self.max_new_tokens <= 0:
            raise UsageError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must not be negative, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"--top_k must not be negative, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.stop == "":
            raise UsageError("--stop is empty; give the string that ends a sample, or leave --stop out")
        validate_text(self, ("out_dir", "init_from"))
        validate_seed(self.seed)
        validate_device_name(self.device)
        return self


@dataclass
class ServeConfig(ModelSource):
    """An OpenAI-compatible HTTP server over a checkpoint or a pretrained GPT-2 (`ngpt serve`)."""

    model_name: str = opt(None, "the model's id in the API (default: the out_dir's name, or init_from)", "Model")
    host: str = opt("127.0.0.1", "address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network)",
                    "Server")
    port: int = opt(8000, "TCP port (0: any free port, printed at start)", "Server")
    api_key: str = opt(None, "require `Authorization: Bearer KEY` on every /v1 endpoint (/health and the page "
                       "stay open; default: $NGPT_API_KEY; none when unset)", "Server")
    max_batch: int = opt(8, "rows decoded together (each a KV-cache slot); a request takes n rows", "Limits")
    max_queue: int = opt(64, "prompts waiting for free rows (each prompt of a request counts); more: 429", "Limits")
    max_tokens: int = opt(512, "the largest max_tokens a request may ask for (and chat's default)", "Limits")
    max_n: int = opt(4, "the largest n (choices per prompt) a request may ask for", "Limits")
    max_request_bytes: int = opt(1_000_000, "the largest request body; larger ones are answered 413", "Limits")

    def validate(self) -> ServeConfig:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_tokens", "max_n", "max_request_bytes"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_n > self.max_batch:
            raise UsageError(f"--max_n ({self.max_n}) cannot exceed --max_batch ({self.max_batch}): the n rows of "
                             "a request decode together")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api_key is empty; give a key, or leave --api_key out to serve without one")
        validate_text(self, ("out_dir", "init_from", "host"))
        if self.model_name is not None:
            validate_text(self, ("model_name",))
        validate_device_name(self.device)
        return self


# ---------------------------------------------------------------- presets

def presets_dir() -> Path:
    """Presets ship inside the wheel (nanogpt_cli/presets); in a source checkout they are ../presets."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "presets", here.parent / "presets"):
        if candidate.is_dir():
            return candidate
    raise UsageError("the presets folder is missing from this installation")


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def load_preset(name_or_path: str) -> dict:
    """A preset by name (`shakespeare-char`) or a path to a .toml file -> a flat dict of keys."""
    path = Path(name_or_path).expanduser()
    if not (name_or_path.endswith(".toml") or path.is_file()):
        path = presets_dir() / f"{name_or_path.replace('_', '-')}.toml"
        if not path.is_file():
            raise UsageError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}")
    if not path.is_file():
        raise UsageError(f"preset file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"preset {str(path)!r} is not valid TOML: {e}") from None
    flat: dict = {}
    for key, value in data.items():  # tables ([model], [optimizer]) are only grouping
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    flat.pop("description", None)
    return flat


def preset_description(name: str) -> str:
    path = presets_dir() / f"{name}.toml"
    return str(tomllib.loads(path.read_text(encoding="utf-8")).get("description", ""))


def resolve_preset(name_or_path: str) -> TrainConfig | SampleConfig:
    """A preset applied to the defaults of the config its keys belong to: TrainConfig, else SampleConfig."""
    keys = load_preset(name_or_path)
    cls = TrainConfig if set(keys) <= set(field_types(TrainConfig)) else SampleConfig
    return build(cls, name_or_path)


# ---------------------------------------------------------------- overrides and coercion

def field_types(cls) -> dict:
    """{field name: its type} of a config dataclass (the annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(value, typ, key: str):
    """Turn a command-line string (or a TOML value) into the field's type, or fail clearly."""
    args = typing.get_args(typ)
    optional = (typing.get_origin(typ) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "auto", "null", "")):
            return None
        typ = next(a for a in args if a is not type(None))
    if isinstance(value, str):
        text = value.strip()
        if typ is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on", "y", "t"):
                return True
            if lowered in ("false", "0", "no", "off", "n", "f"):
                return False
        elif typ is int:
            try:
                return int(text)
            except ValueError:
                try:
                    as_float = float(text)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        elif typ is float:
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
            if number is not None:
                raise UsageError(f"--{key} must be a finite number, got {value!r}")
        elif typ is str:
            return value
        raise UsageError(f"--{key} expects {typ.__name__}, got {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
        raise UsageError(f"{key} must be a finite number, got {value!r}")
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise UsageError(f"--{key} expects {typ.__name__}, got {value!r}")


def _unknown(key: str, valid: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0]}?" if close else f"; see --help for the {len(valid)} keys"
    return UsageError(f"unknown option --{key}{hint}")


def parse_overrides(args: list[str], cls) -> dict:
    """`--key=value`, `--key value`, `--flag`, `--no-flag` (dashes or underscores) -> {field: raw value}."""
    key_types = field_types(cls)
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"unexpected argument {arg!r}; config keys are given as --key=value")
        body = arg[2:]
        key, has_value, value = body.partition("=")
        key = key.replace("-", "_")
        if key not in key_types and key.startswith("no_") and key[3:] in key_types and not has_value:
            if key_types[key[3:]] not in (bool, bool | None):
                raise UsageError(f"--{body} only applies to true/false keys")
            out[key[3:]] = False
            i += 1
            continue
        if key not in key_types:
            raise _unknown(key, list(key_types))
        if not has_value:
            is_bool = key_types[key] in (bool, bool | None)
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not nxt.startswith("--"):
                value = nxt
                i += 1
            elif is_bool:
                value = "true"
            else:
                raise UsageError(f"--{key} needs a value")
        out[key] = value
        i += 1
    return out


def build(cls, preset: str | None = None, args: list[str] | None = None, values: dict | None = None, **more):
    """Resolve a config: dataclass defaults < preset < `values` (and `more`) < command-line args; then validate."""
    values = {**(values or {}), **more}
    key_types = field_types(cls)
    merged: dict = {}
    if preset:
        for key, value in load_preset(preset).items():
            if key not in key_types:
                raise UsageError(f"preset {preset!r}: {_unknown(key, list(key_types))}")
            merged[key] = value
    merged.update({key: value for key, value in values.items() if value is not None})
    if preset and "preset" in key_types:
        merged["preset"] = preset
    merged.update(parse_overrides(args or [], cls))
    typed = {key: coerce(value, key_types[key], key) for key, value in merged.items()}
    cfg = cls(**typed)
    for f in fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise UsageError(f"--{f.name} must be one of {', '.join(map(str, choices))}, got {getattr(cfg, f.name)!r}")
    return cfg.validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config saved in a checkpoint, ignoring keys this version no longer has."""
    known = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in data.items() if key in known})


def to_toml(cfg) -> str:
    """The resolved config as TOML (None values are left out: TOML has no null)."""
    lines = []
    for key, value in to_dict(cfg).items():
        if value is None:
            lines.append(f"# {key} = auto")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{key} = "{escaped}"')
    return "\n".join(lines) + "\n"


def help_epilog(cls, keys: tuple[str, ...] | None = None) -> str:
    """The config keys of `cls` (only `keys`, when given: the ones a command reads), grouped by panel, for a
    command's --help (escaped: typer renders it as rich markup, which would eat `[wandb]`)."""
    from rich.markup import escape

    hints = field_types(cls)
    groups: dict[str, list[str]] = {}
    for f in fields(cls):
        if keys is not None and f.name not in keys:
            continue
        typ = hints[f.name]
        type_name = getattr(typ, "__name__", None) or str(typ).replace("NoneType", "auto").replace(" | ", "|")
        default = "auto" if f.default is None else f.default
        groups.setdefault(f.metadata.get("panel", "Options"), []).append(
            f"  --{f.name} ({type_name}, default {default!r}): {escape(f.metadata.get('help', ''))}")
    parts = ["Config keys (--key=value or --key value; dashes or underscores; --no-FLAG for false):"]
    parts += ["\n".join([f"{panel}:", *rows]) for panel, rows in groups.items()]
    if keys is not None:
        parts.append("The other config keys are accepted (so that any preset works) and change nothing here.")
    return "\n\n".join(parts)
