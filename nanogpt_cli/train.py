"""The training loop, shared by `ngpt train` and `ngpt finetune`; DDP/FSDP-aware under torchrun.

    ngpt train --preset shakespeare-char
    torchrun --standalone --nproc_per_node=8 -m nanogpt_cli train --preset gpt2-124m

`train(cfg)` is a short list of setup steps that each return what they built (`build_trainer`:
dataset, model, runtime, loader, parallel wrapping, optimizer), then `Trainer.run()`, the loop:
evaluate -> checkpoint -> train_step (-> forward_backward per micro-step) -> log. Finetuning is
training that starts from weights.
"""

from __future__ import annotations

import dataclasses
import io
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanogpt_cli import checkpoint as ckpt_io
from nanogpt_cli import lora
from nanogpt_cli.atomic import atomic_file
from nanogpt_cli.config import FINETUNE_DEFAULTS, TrainConfig, build, parse_overrides, to_dict, to_toml
from nanogpt_cli.cpu_tuning import thread_tuner
from nanogpt_cli.data import (
    BatchLoader,
    SyntheticLoader,
    check_block_fits,
    check_vocabulary,
    dataset_path,
    load_meta,
    stream_seed,
)
from nanogpt_cli.distributed import (
    DistEnv,
    any_rank,
    cleanup_distributed,
    dist_env_from_environ,
    full_model_state_dict,
    full_optimizer_state_dict,
    grad_sync,
    load_optimizer_state,
    mean_across_ranks,
    same_on_all_ranks,
    wrap_model,
)
from nanogpt_cli.errors import NgptError, UsageError, one_line
from nanogpt_cli.evaluate import evaluate_loss
from nanogpt_cli.limits import check_model_fits, check_training_fits
from nanogpt_cli.model import GPT
from nanogpt_cli.nonfinite import NonfiniteGuard
from nanogpt_cli.optim import build_optimizer
from nanogpt_cli.progress import TrainProgress, console
from nanogpt_cli.report import print_training_start
from nanogpt_cli.run_folder import RunLock, check_no_run_to_replace, check_out_dir, remove_run
from nanogpt_cli.runtime import Runtime, plan

# what a model's weights fix: its shape, its context and its architecture's options
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "bias", "vocab_size", "block_size", "activation", "position", "rope_base",
              "norm", "qk_norm", "embedding_norm", "tie_embeddings", "logit_softcap", "zero_init_proj")


@dataclass
class TrainResult:
    iter_num: int
    best_val_loss: float
    last_eval: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    stopped_by: str | None = None  # "SIGINT", "SIGTERM" or "nonfinite" when the run ended early


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr. With lr_schedule=wsd (warmup,
    stable, decay) the rate stays at its peak after warmup and cools down linearly to min_lr over the last
    cooldown_frac of lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown_start = max(cfg.warmup_iters, round(cfg.lr_decay_iters * (1 - cfg.cooldown_frac)))
        if it < cooldown_start:
            return cfg.learning_rate
        ratio = (it - cooldown_start) / max(1, cfg.lr_decay_iters - cooldown_start)  # 0 -> 1
        return cfg.learning_rate + ratio * (cfg.min_lr - cfg.learning_rate)
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def padded_vocab(meta: dict) -> int:
    """BPE vocabularies are padded to a multiple of 64 (50257 -> 50304) for faster matmuls."""
    vocab = int(meta["vocab_size"])
    return vocab if meta.get("tokenizer") == "char" else (vocab + 63) // 64 * 64


class StopRequest:
    """SIGINT/SIGTERM: finish the step, save, exit 130/143. A second Ctrl-C aborts at once."""

    def __init__(self, until: str = "this step"):
        self.until = until  # what runs before the save
        self.signal_name: str | None = None
        self.aborted = False  # a second Ctrl-C came
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            self.aborted = True
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.signal_name = signal.Signals(signum).name
        console.print(f"[yellow]{self.signal_name}: finishing {self.until} and saving a checkpoint "
                      "(Ctrl-C again to abort now)[/yellow]")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """The loop over built parts (see `build_trainer`): `run()` evaluates, saves, steps and logs."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, model: GPT, train_model: torch.nn.Module, optimizer,
                 loader, built: BuiltModel, accum_steps: int):
        self.cfg, self.runtime, self.env, self.device = cfg, runtime, runtime.env, runtime.device
        self.model = model  # the module itself: what is saved
        self.train_model = train_model  # what the steps call: compiled and/or wrapped for DDP
        self.optimizer, self.loader, self.meta, self.accum_steps = optimizer, loader, built.meta, accum_steps
        self.lora = built.lora
        # each group's peak rate over --learning_rate (Muon's groups have their own); as built, whatever a resumed
        # optimizer state says
        self.lr_scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
        self.out_dir = Path(cfg.out_dir).expanduser()
        self.tokens_per_iter = accum_steps * self.env.world_size * cfg.batch_size * cfg.block_size
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=(runtime.dtype == "float16" and self.device.type == "cuda"))
        self.guard = NonfiniteGuard(cfg.on_nonfinite, model, optimizer, self.scaler, self.device, self.env,
                                    fsdp=self.env.is_distributed and cfg.strategy == "fsdp",
                                    checkpoint_path=self.out_dir / ckpt_io.CKPT_NAME)
        self.thread_tuner = thread_tuner(self.device, runtime.threads, self.env.is_distributed,
                                         log=lambda text: console.print(text, style="dim"))
        self.iter_num, self.best_val_loss, self.wandb_run_id = 0, float("inf"), None
        self.last_evaluated_iter = -1  # the iteration whose train/val evaluation has been done
        self.resumed_eval_iters = cfg.eval_iters  # the batches each evaluation drew in the run resumed from
        self.loader_state: dict = {}  # the stream's state before the step's first micro-batch: what a save keeps
        self.prefetched: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0's first micro-batch of the step
        self.stop = StopRequest("the steps to the next log interval" if self.stops_at_log_intervals()
                                else "this step (or the evaluation)")
        if built.resume is not None:
            self.restore(built.resume)
        print_training_start(to_dict(cfg), runtime, model.get_num_params(), self.tokens_per_iter, built.warnings)

    # -------------------------------------------------------------- resuming
    def restore(self, resume: dict) -> None:
        self.iter_num = int(resume.get("iter_num", 0))
        self.best_val_loss = float(resume.get("best_val_loss", float("inf")))
        self.wandb_run_id = resume.get("wandb_run_id")
        self.last_evaluated_iter = int(resume.get("evaluated_iter", self.iter_num))
        # the batches an evaluation drew before this checkpoint: its run's eval_iters, whatever this run's is
        self.resumed_eval_iters = int(resume.get("config", {}).get("eval_iters", self.cfg.eval_iters))
        where = ckpt_io.checkpoint_file(self.out_dir)
        per_rank = self.has_rng_per_rank(resume)
        parts = [("optimizer", lambda state: load_optimizer_state(self.model, self.optimizer, state),
                  "optimizer" in resume),
                 ("scaler", self.scaler.load_state_dict, bool(resume.get("scaler"))),
                 ("rng", ckpt_io.set_rng_state, "rng" in resume and not per_rank),
                 # every rank its own generators (dropout), when the run had this many processes
                 ("rng_ranks", lambda states: ckpt_io.set_rng_state(states[self.env.rank]), per_rank),
                 # all ranks share one batch stream (data.py): its state fits any number of processes
                 ("loader", self.loader.load_state_dict, "loader" in resume)]
        for key, load, present in parts:
            if not present:
                continue
            try:
                load(resume[key])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                reason = one_line(e, 200)
                raise NgptError(f"the {key} state in {where} does not fit this run ({type(e).__name__}: {reason}); "
                                "resume with the settings it was trained with, or start from its weights with "
                                f"`ngpt finetune --init_from={where}`") from None
        console.print(f"resuming from iteration {self.iter_num} (best val loss {self.best_val_loss:.4f})")

    def has_rng_per_rank(self, resume: dict) -> bool:
        """Whether the checkpoint holds an RNG state for each of this run's processes."""
        return self.env.is_distributed and len(resume.get("rng_ranks") or []) == self.env.world_size

    def gather_rng_states(self) -> list[dict] | None:
        """Every rank's RNG state, on every rank (a collective): each rank draws its own dropout masks."""
        if not self.env.is_distributed:
            return None
        import torch.distributed as dist

        mine = io.BytesIO()  # as bytes: the object collectives cannot carry tensors' storages
        torch.save(ckpt_io.rng_state(), mine)
        states = [None] * self.env.world_size
        dist.all_gather_object(states, mine.getvalue())
        return [torch.load(buffer, weights_only=True) for buffer in map(io.BytesIO, states)]

    # -------------------------------------------------------------- the steps
    def evaluate(self) -> dict | None:
        """Train and val loss on the next batches of the training stream (nanoGPT's order); None when a signal
        stopped it."""
        return evaluate_loss(self.train_model, self.loader, self.cfg.eval_iters, self.device, self.runtime.dtype,
                             None, self.env, should_stop=lambda: self.stop.signal_name is not None)

    def skip_evaluation(self) -> None:
        """Move the stream past the batches of an evaluation done before the checkpoint this run resumed
        from: the batches after it are the ones the uninterrupted run trained on."""
        for split in ("train", "val"):
            self.loader.skip(split, self.resumed_eval_iters)

    def forward_backward(self, X, Y, last: bool) -> torch.Tensor:
        """One micro-step; gradients sync across ranks only on the last micro-step."""
        with grad_sync(self.train_model, last or not self.env.is_distributed):
            with self.runtime.autocast():
                _, loss = self.train_model(X, Y)
                loss = loss / self.accum_steps  # the mean over the whole accumulated batch
            self.scaler.scale(loss).backward()
        return loss.detach()

    def train_step(self, lr: float) -> torch.Tensor:
        """One optimizer step over accum_steps micro-batches; returns the mean loss over them, unsynced."""
        self.thread_tuner.tick()  # cpu: times the steps, and now and then tries another thread count
        for group, scale in zip(self.optimizer.param_groups, self.lr_scales, strict=True):
            group["lr"] = lr * scale
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            X, Y = self.first_micro_batch() if micro == 0 else self.loader.get_batch("train")
            total += self.forward_backward(X, Y, last=micro == self.accum_steps - 1)
        norm = None
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), self.cfg.grad_clip)
        self.guard.step(total, norm, self.iter_num)
        return total

    def prefetch(self) -> None:
        """Fetch the next step's first micro-batch of the stream ahead (rank 0's), keeping the stream's state
        before it, which is what a checkpoint saves. As in nanoGPT, an evaluation due at that step draws its
        batches after this one."""
        self.loader_state = self.loader.state_dict()
        starts = self.loader.pick("train")
        self.prefetched = self.loader.batch("train", starts) if self.env.rank == 0 else None

    def first_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's first micro-batch of the step: rank 0's was prefetched, rank r takes the stream's r-th
        micro-batch of the step (drawn now, after any evaluation, by every rank alike)."""
        for r in range(1, self.env.world_size):
            starts = self.loader.pick("train")
            if r == self.env.rank:
                self.prefetched = self.loader.batch("train", starts)
        return self.prefetched

    def save(self) -> None:
        self.guard.check(self.iter_num)  # a step skipped on the device is reported before anything is written
        state = {
            "format": ckpt_io.FORMAT,
            "model": full_model_state_dict(self.model),  # FSDP: gathered to rank 0, a collective
            "model_args": dataclasses.asdict(self.model.config),
            "optimizer": full_optimizer_state_dict(self.model, self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "config": to_dict(self.cfg),
            "meta": self.meta,
            "rng": ckpt_io.rng_state(),  # this rank's (rank 0's in the file): what one process resumes with
            "rng_ranks": self.gather_rng_states(),  # several processes: each rank's, in rank order
            "loader": self.loader_state,
            "world_size": self.env.world_size,
            "wandb_run_id": self.wandb_run_id,
            "evaluated_iter": self.last_evaluated_iter,
        }
        if self.lora is not None:  # the adapters alone, and what rebuilds the frozen base under them
            state["model"], state["lora"] = lora.adapter_state_dict(state["model"]), self.lora
        if self.env.is_main:
            try:
                ckpt_io.atomic_save(state, self.out_dir / ckpt_io.CKPT_NAME)
            except NgptError:
                if self.stop.aborted:  # the abort landed inside torch.save, which reports it as a failed write
                    raise KeyboardInterrupt from None
                raise
            if self.lora is not None:
                lora.write_adapter_folder(self.out_dir / lora.ADAPTER_DIR, state["model"], self.lora)

    def log_step(self, loss: torch.Tensor, lr: float, iters: int, seconds: float, metrics, progress) -> float:
        """The step's line and metrics record, every log_interval steps: the only host sync of a step."""
        self.guard.check(self.iter_num)
        mean_loss = mean_across_ranks(loss, self.env)
        tokens_per_s = self.tokens_per_iter * iters / seconds
        mfu = self.runtime.mfu(self.model.flops_per_token() * tokens_per_s / self.env.world_size)  # at most 1
        metrics.step(self.iter_num - 1, mean_loss, lr, tokens_per_s, mfu, 1000 * seconds / iters)
        progress.step(self.iter_num, mean_loss, lr, tokens_per_s, mfu, 1000 * seconds / iters)
        return tokens_per_s

    def evaluate_and_checkpoint(self, lr: float, metrics, progress) -> dict | None:
        """An evaluation, then a checkpoint when val improved (or always_save_checkpoint), never at iteration 0.
        None when a signal stopped the evaluation."""
        self.guard.check(self.iter_num)  # before a checkpoint can be written
        losses = self.evaluate()
        if losses is None:
            return None
        self.last_evaluated_iter = self.iter_num
        metrics.eval(self.iter_num, losses, lr)
        progress.eval(self.iter_num, losses)
        if losses["val"] < self.best_val_loss or self.cfg.always_save_checkpoint:
            self.best_val_loss = min(self.best_val_loss, losses["val"])
            if self.iter_num > 0 and not self.cfg.eval_only:  # an evaluation only writes nothing
                self.save()
        return losses

    # -------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        from nanogpt_cli.metrics import MetricsLog

        cfg = self.cfg
        metrics = MetricsLog(self.out_dir, cfg, enabled=self.env.is_main and not cfg.eval_only,
                             resume_from=self.iter_num, run_id=self.wandb_run_id)
        self.wandb_run_id = metrics.run_id
        result = TrainResult(self.iter_num, self.best_val_loss)
        start_iter, t_start = self.iter_num, time.perf_counter()
        self.prefetch()
        progress = TrainProgress(cfg.max_iters, start_iter)
        with self.stop, progress:
            stop = self.stop
            t_log, iters_since_log = time.perf_counter(), 0
            while True:
                lr = lr_at(self.iter_num, cfg)
                already_evaluated = self.iter_num == self.last_evaluated_iter  # saved after this evaluation
                if (self.iter_num % cfg.eval_interval == 0 and not already_evaluated) or cfg.eval_only:
                    losses = self.evaluate_and_checkpoint(lr, metrics, progress)
                    if losses is None:  # a signal during the evaluation: the training state so far is saved
                        if not cfg.eval_only:
                            self.save()
                        result.stopped_by = stop.signal_name
                        break
                    result.last_eval = losses
                    t_log = time.perf_counter()  # evaluation time is not training speed
                elif already_evaluated:
                    self.skip_evaluation()
                if cfg.eval_only:
                    break
                loss = self.train_step(lr)
                iters_since_log += 1
                self.iter_num += 1
                if self.iter_num % cfg.log_interval == 0 or self.iter_num > cfg.max_iters:
                    now = time.perf_counter()
                    result.tokens_per_second = self.log_step(loss, lr, iters_since_log, now - t_log, metrics, progress)
                    t_log, iters_since_log = now, 0
                if self.iter_num > cfg.max_iters:
                    break
                self.prefetch()
                if self.stop_requested(stop):
                    self.save()
                    result.stopped_by = stop.signal_name
                    break
        metrics.close()
        result.iter_num, result.best_val_loss = self.iter_num, self.best_val_loss
        result.seconds = time.perf_counter() - t_start
        progress.summary(result, metrics.history(), self.out_dir, self.iter_num - start_iter)
        return result

    def stops_at_log_intervals(self) -> bool:
        """Ranks agree on a stop at log intervals only where the agreement (a host sync) is costly: cuda."""
        return self.env.is_distributed and self.device.type == "cuda"

    def stop_requested(self, stop: StopRequest) -> bool:
        """Every rank stops at the same step when any rank got a signal."""
        if self.stops_at_log_intervals() and self.iter_num % self.cfg.log_interval:
            return False
        flag = any_rank(stop.signal_name is not None, self.env, self.device)
        if flag and stop.signal_name is None:
            stop.signal_name = "SIGTERM"  # another rank's signal
        return flag


# ---------------------------------------------------------------- the run's config

def run_config(preset: str | None, args: list[str], finetune: bool = False) -> TrainConfig:
    """The config of `ngpt train` / `ngpt finetune`: dataclass defaults < preset < command line.

    A resumed run continues its own saved config: only the keys on the command line change it, and the keys its
    weights fix (the model's shape and context) cannot. A finetune without a preset starts from finetuning
    defaults (FINETUNE_DEFAULTS), not pretraining's."""
    values = FINETUNE_DEFAULTS if finetune and not preset else {}
    cfg = build(TrainConfig, preset, args, values)
    if cfg.init_from != "resume":
        return cfg
    saved = ckpt_io.load_checkpoint(cfg.out_dir, mmap=True).get("config") or {}  # its config: no tensor is read
    typed = parse_overrides(args, TrainConfig)
    resumed = build(TrainConfig, None, args, {key: value for key, value in saved.items()
                                              if key in TrainConfig.__dataclass_fields__})
    for key in (*SHAPE_KEYS, *lora.LORA_KEYS):
        if key in typed and key in saved and getattr(resumed, key) != saved[key]:
            raise UsageError(f"--{key}={getattr(resumed, key)}: a resumed run keeps its model's {key} "
                             f"({saved[key]}); drop --{key}, or start from its weights with "
                             f"`ngpt finetune --init_from={cfg.out_dir} --out_dir=NEW_FOLDER`")
    return resumed


def schedule_warnings(cfg: TrainConfig) -> list[str]:
    """What is wrong with a learning-rate schedule that cannot do what its keys say."""
    if not cfg.decay_lr or cfg.eval_only or cfg.warmup_iters <= cfg.max_iters:
        return []
    peak = lr_at(cfg.max_iters, cfg)
    return [f"[yellow]warmup_iters ({cfg.warmup_iters}) is longer than the run (max_iters {cfg.max_iters}): the "
            f"learning rate only reaches {peak:.3g} of learning_rate {cfg.learning_rate:g}; lower --warmup_iters"
            "[/yellow]"]


# ---------------------------------------------------------------- setup steps

@dataclass
class Dataset:
    """A prepared dataset: its folder and meta.json."""

    name: str
    folder: Path
    meta: dict


@dataclass
class BuiltModel:
    """What `build_model` made: the model (on the cpu), its tokenizer metadata, the checkpoint it resumes
    from (None otherwise) and warnings to show once the setup has worked."""

    model: GPT
    meta: dict
    resume: dict | None = None
    warnings: list[str] = field(default_factory=list)
    lora: dict | None = None  # a LoRA run's adapter settings and base reference (its checkpoint's "lora")


def open_dataset(cfg: TrainConfig) -> Dataset | None:
    """The dataset cfg names (None for synthetic batches)."""
    if cfg.dataset == "synthetic":
        return None
    folder = dataset_path(cfg.dataset, cfg.data_dir)
    return Dataset(cfg.dataset, folder, load_meta(folder))


def build_model(cfg: TrainConfig, dataset: Dataset | None) -> BuiltModel:
    """The model to train, from scratch, from the run being resumed, or from pretrained weights (finetuning:
    GPT-2, a Hugging Face model or another ngpt run), cropped to cfg.block_size (auto: the model's own); with
    cfg.lora_rank, frozen under LoRA adapters."""
    if cfg.init_from == "scratch":
        meta = dataset.meta if dataset else {"tokenizer": "gpt2", "vocab_size": 50257}
        vocab_size = cfg.vocab_size or (padded_vocab(dataset.meta) if dataset else 50304)
        model_config = cfg.model_config(vocab_size)
        if dataset is not None:  # from the files' sizes, before a position table of that length exists
            check_block_fits(dataset.folder, dataset.meta, model_config.block_size)
        check_model_fits(model_config.n_layer, model_config.n_embd, vocab_size, model_config.block_size, "the model")
        built = BuiltModel(GPT(model_config), meta)
        if cfg.lora_rank:  # random weights under adapters: what `ngpt bench` measures (train refuses it)
            built.lora = {**lora.settings(cfg), "base": None}
    elif cfg.init_from == "resume":
        out_dir = Path(cfg.out_dir).expanduser()
        resume = ckpt_io.load_checkpoint(out_dir)
        if cfg.lora_rank and "lora" not in resume:
            raise UsageError(f"--lora_rank: {out_dir} is a run of all the weights, which resumes as one; to train "
                             f"adapters on its weights: `ngpt finetune --init_from={out_dir} --lora_rank="
                             f"{cfg.lora_rank} --out_dir=NEW_FOLDER`")
        built = BuiltModel(ckpt_io.model_from_checkpoint(resume, str(ckpt_io.checkpoint_file(out_dir)), cfg.dropout,
                                                         merged=False),
                           ckpt_io.checkpoint_meta(resume, out_dir), resume, lora=resume.get("lora"))
        trained_on = resume.get("config", {}).get("dataset", TrainConfig.dataset)
        if trained_on != cfg.dataset:
            built.warnings.append(f"[yellow]resuming a run trained on {trained_on!r} with {cfg.dataset!r}[/yellow]")
    else:
        model, meta, _ = ckpt_io.load_model(cfg.init_from, cfg.out_dir, dropout=cfg.dropout)
        built = BuiltModel(model, meta)
        if cfg.lora_rank:  # the base's fingerprint is of its weights as loaded, before any crop
            built.lora = {**lora.settings(cfg), "base": lora.base_reference(cfg.init_from, cfg.out_dir, model)}
    model_block = built.model.config.block_size
    if cfg.block_size is not None and cfg.block_size > model_block:
        raise UsageError(f"--block_size={cfg.block_size} is larger than the model's {model_block}")
    if cfg.block_size is not None and cfg.block_size < model_block:
        built.model.crop_block_size(cfg.block_size)
    if built.lora is not None and built.resume is None:
        lora.attach(built.model, built.lora)
    return built


def with_model_shape(cfg: TrainConfig, model: GPT) -> TrainConfig:
    """The run's config as it trains: the model's own shape where the model came from weights."""
    return dataclasses.replace(cfg, **{key: getattr(model.config, key) for key in SHAPE_KEYS})


def accumulation_steps(cfg: TrainConfig, env: DistEnv) -> int:
    """Micro-steps per optimizer step in each process: the run's accumulation shared out over the processes."""
    if cfg.gradient_accumulation_steps % env.world_size:
        raise UsageError(f"--gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible "
                         f"by the number of processes ({env.world_size})")
    return cfg.gradient_accumulation_steps // env.world_size


def run_flops(cfg: TrainConfig, model: GPT, tokens_per_iter: int) -> float | None:
    """The FLOPs of the whole run, training and evaluations (a forward is a third of a training step), for the
    compile choice; None for an evaluation only."""
    if cfg.eval_only:
        return None
    tokens = cfg.max_iters * tokens_per_iter
    tokens += (cfg.max_iters // cfg.eval_interval + 1) * 2 * cfg.eval_iters * cfg.batch_size * cfg.block_size / 3
    return tokens * model.flops_per_token()


def make_loader(cfg: TrainConfig, dataset: Dataset | None, vocab_size: int, runtime: Runtime):
    """The batch stream: torch's global generator where the model's initialisation left it (rank 0's, on
    every rank), as nanoGPT's get_batch draws. A resumed run sets its state from the checkpoint. Dropout, which
    also draws from the global generator, gets a stream of its own (per rank), so that the generator that picks
    the batches does not also draw the dropout masks (nanoGPT's dropout shares the batches' stream)."""
    env = runtime.env
    state = same_on_all_ranks(torch.get_rng_state(), env)
    torch.manual_seed(stream_seed(cfg.seed + env.rank))
    if dataset is None:
        return SyntheticLoader(vocab_size, cfg.batch_size, cfg.block_size, runtime.device, cfg.seed, env.rank,
                               env.world_size, generator_state=state)
    return BatchLoader(dataset.folder, dataset.meta, cfg.batch_size, cfg.block_size, runtime.device, cfg.seed,
                       env.rank, env.world_size, generator_state=state)


def parallelize(model: GPT, strategy: str, runtime: Runtime) -> torch.nn.Module:
    """What the training steps call: the model sharded (FSDP, before compiling), compiled, and/or wrapped in
    DDP (around the compiled model). FSDP2 shards in place, so `model` stays the module to save."""
    env = runtime.env
    if env.is_distributed and strategy == "fsdp":
        model = wrap_model(model, strategy, runtime.device, env)
    if runtime.compile:
        model = torch.compile(model)
    if env.is_distributed and strategy != "fsdp":
        model = wrap_model(model, strategy, runtime.device, env)
    return model


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Every setup step, in order; nothing is written to disk."""
    env = dist_env_from_environ()
    accum_steps = accumulation_steps(cfg, env)
    torch.manual_seed(cfg.seed + env.rank)  # the weights' initialisation, then (rank 0's) batch stream
    dataset = open_dataset(cfg)
    built = build_model(cfg, dataset)
    model = built.model
    cfg = with_model_shape(cfg, model)
    built.warnings += schedule_warnings(cfg)
    if dataset is not None:
        check_vocabulary(dataset.meta, built.meta, model.config.vocab_size, cfg.dataset)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    runtime = plan(cfg.device, cfg.dtype, cfg.compile, training=True, backend=cfg.backend,
                   run_flops=run_flops(cfg, model, tokens_per_iter))
    check_training_fits(cfg, model.config.vocab_size, runtime.device)
    loader = make_loader(cfg, dataset, model.config.vocab_size, runtime)
    model.to(runtime.device)
    model.set_attention(runtime.attention)
    if built.lora is not None:
        fsdp = env.is_distributed and cfg.strategy == "fsdp"  # FSDP shards a block's parameters in one dtype
        held = lora.hold_frozen_in_bfloat16(model) if runtime.dtype == "bfloat16" and not fsdp else 0
        built.warnings.append(lora.describe(model, built.lora, held))
    # Parallelise before the optimizer exists: FSDP turns the parameters into shards (DTensors).
    train_model = parallelize(model, cfg.strategy, runtime)
    optimizer = build_optimizer(model, cfg, runtime.device.type)
    return Trainer(cfg, runtime, model, train_model, optimizer, loader, built, accum_steps)


def train(cfg: TrainConfig, overwrite: bool = False) -> TrainResult:
    """Run training (or finetuning) as `cfg` says; under torchrun each process calls this. A folder that holds
    a run is replaced only with `overwrite`; an evaluation only (eval_only) writes nothing."""
    env = dist_env_from_environ()
    if cfg.lora_rank and cfg.init_from == "scratch":
        raise UsageError("--lora_rank adapts pretrained weights and --init_from=scratch has none: finetune from "
                         "gpt2*, a Hugging Face model or an ngpt run (`ngpt finetune --init_from=gpt2 ...`)")
    out_dir = Path(cfg.out_dir).expanduser()
    writes = env.is_main and not cfg.eval_only
    if writes:
        check_no_run_to_replace(out_dir, cfg.init_from == "resume", overwrite)
        check_out_dir(out_dir)
    lock = RunLock(out_dir)
    done = False
    try:
        trainer = build_trainer(cfg)
        if writes:  # the first write: nothing on disk changes until the setup worked
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if overwrite and cfg.init_from != "resume":
                remove_run(out_dir)
            with atomic_file(out_dir / "config.toml") as f:
                f.write(to_toml(trainer.cfg).encode())
        result = trainer.run()
        del trainer  # the DDP/FSDP wrappers go before the process group (see cleanup_distributed)
        done = True
        return result
    finally:
        lock.release()
        cleanup_distributed(barrier=done)
