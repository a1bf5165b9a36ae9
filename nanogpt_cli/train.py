"""The training loop, shared by `ngpt train` and `ngpt finetune`; DDP-aware under torchrun.

    ngpt train --preset shakespeare-char
    torchrun --standalone --nproc_per_node=8 -m nanogpt_cli train --preset gpt2-124m

train() sets up (device, data, model, optimizer) and runs Trainer.run(), which is
evaluate -> checkpoint -> train_step (-> forward_backward per micro-step) -> log.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanogpt_cli import checkpoint as ckpt_io
from nanogpt_cli.config import TrainConfig, from_dict, to_dict, to_toml
from nanogpt_cli.data import BatchLoader, SyntheticLoader, dataset_path, load_meta, stream_seed
from nanogpt_cli.device import (
    DistEnv,
    apply_threads,
    autocast,
    choose_compile,
    choose_dtype,
    choose_threads,
    cleanup_distributed,
    dist_env_from_environ,
    init_distributed,
    keep_freed_host_memory,
    peak_flops,
    resolve_device,
    thread_tuner,
    training_attention,
)
from nanogpt_cli.distributed import (
    full_model_state_dict,
    full_optimizer_state_dict,
    grad_sync,
    load_optimizer_state,
    local_grads,
    mean_across_ranks,
    wrap_model,
)
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.evaluate import evaluate_loss
from nanogpt_cli.model import GPT, GPTConfig
from nanogpt_cli.progress import TrainProgress, console

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


@dataclass
class TrainResult:
    iter_num: int
    best_val_loss: float
    last_eval: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    stopped_by: str | None = None  # "SIGINT", "SIGTERM" or "nonfinite" when the run ended early


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
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
        self.previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.signal_name = signal.Signals(signum).name
        console.print(f"[yellow]{self.signal_name}: finishing {self.until} and saving a checkpoint "
                      "(Ctrl-C again to abort now)[/yellow]")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: TrainConfig, device: torch.device, env: DistEnv, finetune: bool = False):
        self.cfg, self.device, self.env, self.finetune = cfg, device, env, finetune
        self.notes: list[str] = []  # warnings from the setup, shown once it has worked
        self.out_dir = Path(cfg.out_dir).expanduser()
        self.memory_why = keep_freed_host_memory() if device.type == "cpu" else ""
        self.threads, self.threads_why = choose_threads(device)  # before the dtype choice: it measures matmuls
        apply_threads(self.threads)
        self.thread_tuner = thread_tuner(device, self.threads, env.is_distributed,
                                         log=lambda text: console.print(text, style="dim"))
        # measured choices (cpu) could differ between processes: every rank takes rank 0's
        self.dtype, self.dtype_why = same_on_all_ranks(choose_dtype(device, cfg.dtype, training=True), env)
        if cfg.gradient_accumulation_steps % env.world_size:
            raise UsageError(f"--gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible "
                             f"by the number of processes ({env.world_size})")
        self.accum_steps = cfg.gradient_accumulation_steps // env.world_size
        self.tokens_per_iter = self.accum_steps * env.world_size * cfg.batch_size * cfg.block_size
        self.iter_num, self.best_val_loss, self.wandb_run_id = 0, float("inf"), None
        self.evaluated_iter = -1  # the iteration whose train/val evaluation has been done
        torch.manual_seed(cfg.seed + env.rank)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere and newer
            torch.backends.cudnn.allow_tf32 = True

        resume = self.load_initial(cfg)
        self.loader = self.make_loader()
        self.check_vocab()
        self.model.to(device)
        self.model.set_attention(training_attention(device, self.dtype))
        # Parallelise before the optimizer exists: FSDP turns the parameters into shards (DTensors).
        # raw_model is the model itself (FSDP2 shards in place), self.model what the steps call.
        self.raw_model = self.model
        if env.is_distributed and cfg.strategy == "fsdp":
            self.model = wrap_model(self.model, cfg, device, env)  # shard first, then compile
        self.use_compile, self.compile_why = same_on_all_ranks(
            choose_compile(device, cfg.compile, self.estimated_run_seconds()), env)
        if self.use_compile:
            self.model = torch.compile(self.model)
        if env.is_distributed and cfg.strategy != "fsdp":
            self.model = wrap_model(self.model, cfg, device, env)  # DDP around the compiled model
        self.scaler = torch.amp.GradScaler(device.type, enabled=(self.dtype == "float16" and device.type == "cuda"))
        self.optimizer = self.raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                             (cfg.beta1, cfg.beta2), device.type)
        # cuda: a non-finite step is skipped on the GPU (fused AdamW's found_inf) and reported at the next log
        # interval, so that no step waits for the GPU; elsewhere it is checked at once (a sync costs nothing there)
        self.defer_nonfinite = defer_nonfinite_checks(device, self.optimizer, self.scaler.is_enabled(),
                                                      env.is_distributed and cfg.strategy == "fsdp")
        self.nonfinite_steps = 0
        self.pending_nonfinite = torch.zeros((), device=device)
        self.first_nonfinite = torch.full((), -1.0, device=device)
        if resume is not None:
            self.restore(resume)
        self.peak, self.peak_why = peak_flops(device, self.dtype)
        n_params = self.raw_model.get_num_params()
        show_config(cfg)  # once the setup worked: a refused run prints only its error line
        for note in self.notes:
            console.print(note)
        console.print(f"[bold]device[/bold] {device} ({env.world_size} process{'es' if env.world_size > 1 else ''})"
                      f"  [bold]dtype[/bold] {self.dtype}: {self.dtype_why}  [bold]compile[/bold] {self.use_compile}: "
                      f"{self.compile_why}"
                      + (f"  [bold]threads[/bold] {self.threads_why}  [bold]host memory[/bold] {self.memory_why}"
                         if device.type == "cpu" else ""))
        console.print(f"[bold]model[/bold] {n_params / 1e6:.2f}M parameters  [bold]tokens/iter[/bold] "
                      f"{self.tokens_per_iter:,}  [bold]peak[/bold] "
                      f"{f'{self.peak / 1e12:.2f} TFLOP/s' if self.peak else 'unknown'} ({self.peak_why})")

    def estimated_run_seconds(self) -> float | None:
        """About how long this run takes on cpu, for the compile choice: its training and evaluation FLOPs
        at a third of the measured matmul peak (what small GPTs reached in eager mode, measured)."""
        if self.device.type != "cpu" or self.cfg.eval_only:
            return None
        cfg, peak = self.cfg, peak_flops(self.device, self.dtype)[0]
        tokens = cfg.max_iters * self.tokens_per_iter
        tokens += (cfg.max_iters // cfg.eval_interval + 1) * 2 * cfg.eval_iters * cfg.batch_size * cfg.block_size / 3
        return tokens * self.raw_model.flops_per_token() / (peak / 3)

    # -------------------------------------------------------------- setup steps
    def load_initial(self, cfg: TrainConfig) -> dict | None:
        """Build self.model from scratch, a checkpoint (resume or finetune) or pretrained weights."""
        self.data_meta = self.read_data_meta()
        if cfg.init_from == "scratch":
            vocab = cfg.vocab_size or (padded_vocab(self.data_meta) if self.data_meta else 50304)
            self.model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS if k != "vocab_size"},
                                       vocab_size=vocab, activation="gelu"))  # nanoGPT's exact GELU
            self.meta = self.data_meta or {"tokenizer": "gpt2", "vocab_size": 50257}
            return None
        if cfg.init_from == "resume":
            resume = ckpt_io.load_checkpoint(self.out_dir)
            saved = from_dict(TrainConfig, resume.get("config", {}))
            for key in ("n_layer", "n_head", "n_embd", "bias", "vocab_size"):  # the shape is the checkpoint's
                setattr(cfg, key, resume["model_args"].get(key, getattr(cfg, key)))
            if saved.dataset != cfg.dataset:
                self.notes.append(f"[yellow]resuming a run trained on {saved.dataset!r} with {cfg.dataset!r}[/yellow]")
            self.model = ckpt_io.model_from_checkpoint(resume, str(ckpt_io.checkpoint_file(self.out_dir)), cfg.dropout)
            self.meta = ckpt_io.checkpoint_meta(resume, self.out_dir)
            self.check_block_size()
            return resume
        # Finetuning: weights from pretrained GPT-2, a Hugging Face model or another ngpt run.
        self.model, self.meta, _ = ckpt_io.load_model(cfg.init_from, cfg.out_dir, dropout=cfg.dropout)
        for key in ("n_layer", "n_head", "n_embd", "bias", "vocab_size"):
            setattr(cfg, key, getattr(self.model.config, key))
        self.check_block_size()
        return None

    def check_block_size(self) -> None:
        model_block = self.model.config.block_size
        if self.cfg.block_size > model_block:
            raise UsageError(f"--block_size={self.cfg.block_size} is larger than the model's {model_block}")
        if self.cfg.block_size < model_block:
            self.model.crop_block_size(self.cfg.block_size)

    def read_data_meta(self) -> dict | None:
        if self.cfg.dataset == "synthetic":
            return None
        folder = dataset_path(self.cfg.dataset, self.cfg.data_dir)
        self.data_folder = folder
        return load_meta(folder)

    def make_loader(self):
        """The batch stream: torch's global generator where the model's initialisation left it (rank 0's, on
        every rank), as nanoGPT's get_batch draws. A resumed run sets the state from its checkpoint."""
        cfg = self.cfg
        state = same_on_all_ranks(torch.get_rng_state(), self.env)
        # Dropout draws from the global generator: a stream of its own (per rank), so that the words that pick
        # the batches do not also draw the first dropout masks. (nanoGPT's dropout shares its batches' stream.)
        torch.manual_seed(stream_seed(cfg.seed + self.env.rank))
        if self.data_meta is None:
            return SyntheticLoader(self.model.config.vocab_size, cfg.batch_size, cfg.block_size, self.device,
                                   cfg.seed, self.env.rank, self.env.world_size, generator_state=state)
        return BatchLoader(self.data_folder, self.data_meta, cfg.batch_size, cfg.block_size, self.device,
                           cfg.seed, self.env.rank, self.env.world_size, generator_state=state)

    def check_vocab(self) -> None:
        if self.data_meta is None:
            return
        data_tok, model_tok = self.data_meta.get("tokenizer"), self.meta.get("tokenizer")
        if data_tok != model_tok:
            raise NgptError(f"the dataset {self.cfg.dataset!r} uses the {data_tok!r} tokenizer but the model was "
                            f"trained with {model_tok!r}; prepare the data with the model's tokenizer")
        if data_tok == "char" and self.data_meta.get("itos") != self.meta.get("itos"):
            raise NgptError(f"the dataset {self.cfg.dataset!r} has a different character vocabulary from the "
                            "model's; prepare it with the same characters, or train a new model")
        if self.data_meta["vocab_size"] > self.model.config.vocab_size:
            raise NgptError(f"the dataset's vocabulary ({self.data_meta['vocab_size']}) is larger than the model's "
                            f"({self.model.config.vocab_size})")

    def restore(self, resume: dict) -> None:
        self.iter_num = int(resume.get("iter_num", 0))
        self.best_val_loss = float(resume.get("best_val_loss", float("inf")))
        self.wandb_run_id = resume.get("wandb_run_id")
        self.evaluated_iter = int(resume.get("evaluated_iter", self.iter_num))
        # the batches an evaluation drew before this checkpoint: its run's eval_iters, whatever this run's is
        self.resumed_eval_iters = int(resume.get("config", {}).get("eval_iters", self.cfg.eval_iters))
        where = ckpt_io.checkpoint_file(self.out_dir)
        parts = [("optimizer", lambda state: load_optimizer_state(self.raw_model, self.optimizer, state),
                  "optimizer" in resume),
                 ("scaler", self.scaler.load_state_dict, bool(resume.get("scaler"))),
                 ("rng", ckpt_io.set_rng_state, "rng" in resume and not self.own_rng(resume)),
                 # every rank its own generators (dropout), when the run had this many processes
                 ("rng_ranks", lambda states: ckpt_io.set_rng_state(states[self.env.rank]), self.own_rng(resume)),
                 # all ranks share one batch stream (data.py): its state fits any number of processes
                 ("loader", self.loader.load_state_dict, "loader" in resume)]
        for key, load, present in parts:
            if not present:
                continue
            try:
                load(resume[key])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                reason = " ".join(str(e).split())[:200]
                raise NgptError(f"the {key} state in {where} does not fit this run ({type(e).__name__}: {reason}); "
                                "resume with the settings it was trained with, or start from its weights with "
                                f"`ngpt finetune --init_from={where}`") from None
        console.print(f"resuming from iteration {self.iter_num} (best val loss {self.best_val_loss:.4f})")

    def own_rng(self, resume: dict) -> bool:
        """Whether the checkpoint holds an RNG state for each of this run's processes."""
        return self.env.is_distributed and len(resume.get("rng_ranks") or []) == self.env.world_size

    def gather_rng_states(self) -> list[dict] | None:
        """Every rank's RNG state, on every rank (a collective): each rank draws its own dropout masks."""
        if not self.env.is_distributed:
            return None
        import io

        import torch.distributed as dist

        mine = io.BytesIO()  # as bytes: the object collectives cannot carry tensors' storages
        torch.save(ckpt_io.rng_state(), mine)
        states = [None] * self.env.world_size
        dist.all_gather_object(states, mine.getvalue())
        return [torch.load(buffer, weights_only=True) for buffer in map(io.BytesIO, states)]

    # -------------------------------------------------------------- the steps
    def evaluate(self) -> dict:
        """Train and val loss on the next batches of the training stream (nanoGPT's order)."""
        return evaluate_loss(self.model, self.loader, self.cfg.eval_iters, self.device, self.dtype, None, self.env)

    def skip_evaluation(self) -> None:
        """Move the stream past the batches of an evaluation done before the checkpoint this run resumed
        from: the batches after it are the ones the uninterrupted run trained on."""
        for split in ("train", "val"):
            self.loader.skip(split, self.resumed_eval_iters)

    def forward_backward(self, X, Y, last: bool) -> torch.Tensor:
        """One micro-step; gradients sync across ranks only on the last micro-step."""
        with grad_sync(self.model, last or not self.env.is_distributed):
            with autocast(self.device, self.dtype):
                _, loss = self.model(X, Y)
                loss = loss / self.accum_steps  # the mean over the whole accumulated batch
            self.scaler.scale(loss).backward()
        return loss.detach()

    def train_step(self, lr: float) -> torch.Tensor:
        """One optimizer step over accum_steps micro-batches; returns the summed (mean) loss, unsynced."""
        self.thread_tuner.tick()  # cpu: times the steps, and now and then tries another thread count
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum_steps):
            X, Y = self.first_batch() if micro == 0 else self.loader.get_batch("train")
            total += self.forward_backward(X, Y, last=micro == self.accum_steps - 1)
        norm = None
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.defer_nonfinite:
            return self.step_without_sync(total, norm)
        if not self.loss_is_finite(total, norm):
            if self.scaler.is_enabled() and self.cfg.grad_clip <= 0:
                self.scaler.unscale_(self.optimizer)  # update() needs the inf check that unscale_ records
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            return total
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def nonfinite_flag(self, total: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """A 0-dim float32 tensor on the device (the shape fused AdamW's found_inf takes), 1.0 when the loss
        or a gradient is NaN/inf on any rank; no host sync. The clipping norm, when there is one, already
        covers every gradient (all of them, after DDP's all-reduce)."""
        bad = ~torch.isfinite(total.float()).reshape(())
        if self.scaler.is_enabled():
            pass  # float16: overflowing gradients are the GradScaler's business (it skips the step, lowers the scale)
        elif norm is not None and not (self.env.is_distributed and self.cfg.strategy == "fsdp"):
            bad |= ~torch.isfinite(norm.float()).reshape(())
        else:
            grads = local_grads(self.raw_model)  # FSDP: this rank's shards (the all_reduce below covers the rest)
            if grads:
                bad |= ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        bad = bad.float()
        if self.env.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad

    def step_without_sync(self, total: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """The optimizer step on cuda, without waiting for the GPU: the fused AdamW kernel itself skips the
        update (and its step count) when found_inf is 1, as it does under a GradScaler, and the flag is read
        with the loss at the next log interval, evaluation or save (check_nonfinite)."""
        bad = self.nonfinite_flag(total, norm)
        self.optimizer.found_inf = bad
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_nonfinite += bad
        self.first_nonfinite = torch.where((self.first_nonfinite < 0) & (bad > 0),
                                           torch.full_like(bad, self.iter_num), self.first_nonfinite)
        return total

    def check_nonfinite(self) -> None:
        """Report the steps step_without_sync skipped since the last check (a host sync): stop or warn."""
        if not self.defer_nonfinite:
            return
        count = int(self.pending_nonfinite.item())
        if not count:
            return
        first = int(self.first_nonfinite.item())
        self.pending_nonfinite.zero_()
        self.first_nonfinite.fill_(-1)
        self.nonfinite_steps += count
        skipped = f"{count} step(s) skipped by iteration {self.iter_num}"
        self.on_nonfinite(f"the loss or gradients became non-finite at iteration {first} ({skipped}); stopped",
                          f"the loss or gradients became non-finite at iteration {first}: {skipped}")

    def on_nonfinite(self, stopped: str, skipped: str) -> None:
        """--on_nonfinite: stop (an NgptError saying what and that the last checkpoint is intact) or warn."""
        if self.cfg.on_nonfinite == "stop":
            ckpt = self.out_dir / ckpt_io.CKPT_NAME
            kept = (f"the last checkpoint {ckpt} is intact" if ckpt.is_file() else "no checkpoint had been saved yet")
            raise NgptError(f"{stopped} ({kept}). Lower --learning_rate, or use --on_nonfinite=skip to skip such steps")
        console.print(f"[yellow]{skipped}[/yellow]")

    def loss_is_finite(self, total: torch.Tensor, norm: torch.Tensor | None = None) -> bool:
        """False (step skipped) or an NgptError (on_nonfinite=stop) when the loss or any gradient is NaN/inf:
        a finite loss with an inf gradient would otherwise turn the weights into NaNs. With a GradScaler
        (float16) overflowing gradients are the scaler's business (it skips the step and lowers the scale),
        but a non-finite loss is not an overflow: it is caught here all the same."""
        if self.nonfinite_flag(total, norm).item() == 0.0:
            return True
        self.nonfinite_steps += 1
        what = f"the loss became {total.item()}" if not torch.isfinite(total) else "the gradients became non-finite"
        self.on_nonfinite(f"{what} at iteration {self.iter_num}; stopped before updating the weights",
                          f"{what} at iteration {self.iter_num}: step skipped")
        return False

    def fetch_first_batch(self) -> None:
        """The step's first micro-batch of the stream, fetched ahead (rank 0's); the loader state before it is
        what a checkpoint keeps. As in nanoGPT, an evaluation due at this step draws its batches after it."""
        self.loader_state = self.loader.state_dict()
        starts = self.loader.next_draw("train")
        self.next_batch = self.loader.batch("train", starts) if self.env.rank == 0 else None

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's first micro-batch of the step: rank 0's was fetched ahead, rank r takes the stream's
        r-th micro-batch of the step (drawn now, after any evaluation, by every rank alike)."""
        for r in range(1, self.env.world_size):
            starts = self.loader.next_draw("train")
            if r == self.env.rank:
                self.next_batch = self.loader.batch("train", starts)
        return self.next_batch

    def save(self) -> None:
        state = {
            "format": ckpt_io.FORMAT,
            "model": full_model_state_dict(self.raw_model),  # FSDP: gathered to rank 0, a collective
            "model_args": {k: getattr(self.raw_model.config, k) for k in (*MODEL_KEYS, "activation")},
            "optimizer": full_optimizer_state_dict(self.raw_model, self.optimizer),
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
            "evaluated_iter": self.evaluated_iter,
        }
        if self.env.is_main:
            ckpt_io.atomic_save(state, self.out_dir / ckpt_io.CKPT_NAME)

    # -------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        from nanogpt_cli.metrics import MetricsLog

        metrics = MetricsLog(self.out_dir, cfg, enabled=env.is_main, resume_from=self.iter_num,
                             run_id=self.wandb_run_id)
        self.wandb_run_id = metrics.run_id
        result = TrainResult(self.iter_num, self.best_val_loss)
        start_iter, t_start = self.iter_num, time.perf_counter()
        self.fetch_first_batch()
        progress = TrainProgress(cfg.max_iters, start_iter)
        sync_stop = env.is_distributed and self.device.type == "cuda"  # see stop_requested
        with StopRequest("the steps to the next log interval" if sync_stop else "this step") as stop, progress:
            t_log, iters_since_log = time.perf_counter(), 0
            while True:
                lr = lr_at(self.iter_num, cfg)
                already_evaluated = self.iter_num == self.evaluated_iter  # a checkpoint saved after this eval
                if (self.iter_num % cfg.eval_interval == 0 and not already_evaluated) or cfg.eval_only:
                    self.check_nonfinite()  # before a checkpoint can be written
                    losses = self.evaluate()
                    self.evaluated_iter = self.iter_num
                    result.last_eval = losses
                    metrics.eval(self.iter_num, losses, lr)
                    progress.eval(self.iter_num, losses)
                    if losses["val"] < self.best_val_loss or cfg.always_save_checkpoint:
                        self.best_val_loss = min(self.best_val_loss, losses["val"])
                        if self.iter_num > 0:
                            self.save()
                    t_log = time.perf_counter()  # evaluation time is not training speed
                elif already_evaluated:
                    self.skip_evaluation()
                if cfg.eval_only:
                    break
                loss = self.train_step(lr)
                iters_since_log += 1
                self.iter_num += 1
                if self.iter_num % cfg.log_interval == 0 or self.iter_num > cfg.max_iters:
                    self.check_nonfinite()
                    lossf = mean_across_ranks(loss, env)  # the only host sync of the step, once per log interval
                    now = time.perf_counter()
                    ms_per_iter = 1000 * (now - t_log) / iters_since_log
                    tokens_per_s = self.tokens_per_iter * iters_since_log / (now - t_log)
                    mfu = self.raw_model.estimate_mfu(tokens_per_s / env.world_size, self.peak)
                    metrics.step(self.iter_num - 1, lossf, lr, tokens_per_s, mfu, ms_per_iter)
                    progress.step(self.iter_num, lossf, lr, tokens_per_s, mfu, ms_per_iter)
                    result.tokens_per_second = tokens_per_s
                    t_log, iters_since_log = now, 0
                if self.iter_num > cfg.max_iters:
                    break
                self.fetch_first_batch()
                if self.stop_requested(stop):
                    self.check_nonfinite()
                    self.save()
                    result.stopped_by = stop.signal_name
                    break
        metrics.close()
        result.iter_num, result.best_val_loss = self.iter_num, self.best_val_loss
        result.seconds = time.perf_counter() - t_start
        progress.summary(result, metrics.history(), self.out_dir, self.iter_num - start_iter)
        return result

    def stop_requested(self, stop: StopRequest) -> bool:
        """Every rank stops at the same step when any rank got a signal."""
        flag = stop.signal_name is not None
        if self.env.is_distributed and self.device.type == "cuda" and self.iter_num % self.cfg.log_interval:
            return False  # all ranks agree at log intervals only: the agreement is a host sync, costly on GPUs
        if self.env.is_distributed:
            import torch.distributed as dist

            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and stop.signal_name is None:
                stop.signal_name = "SIGTERM"
        return flag


def same_on_all_ranks(value, env: DistEnv):
    """Rank 0's value on every rank (a collective): choices measured on each rank must agree."""
    if not env.is_distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def show_config(cfg: TrainConfig) -> None:
    """The resolved config, compactly, at the start of a run."""
    pairs = [f"{k}={'auto' if v is None else v}" for k, v in to_dict(cfg).items()]
    console.print("[bold]config[/bold] " + "  ".join(pairs), style="dim")


def defer_nonfinite_checks(device: torch.device, optimizer, scaler_enabled: bool, fsdp: bool) -> bool:
    """Whether non-finite steps are skipped on the device and reported later (cuda with fused AdamW, no
    GradScaler, no FSDP's sharded gradients) instead of checked at every step with a host sync."""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    return device.type == "cuda" and fused and not scaler_enabled and not fsdp


def check_out_dir(out_dir: Path) -> None:
    """Fail before training, not at the first checkpoint, when out_dir cannot be written.

    Leaves the disk as it found it: the probe file and the folders made for it are removed again,
    so a run refused later (a missing dataset, a checkpoint that does not fit) changes nothing."""
    created = []  # the folders this check makes, deepest first
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NgptError(f"cannot use out_dir {out_dir}: {parent} is a file, not a folder")
            break
        created.append(parent)
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:  # written through to the disk: a full disk fails here, not hours later
            f.write(b"0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise NgptError(f"cannot write to out_dir {out_dir}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


def train(cfg: TrainConfig, finetune: bool = False) -> TrainResult:
    """Run training as `cfg` says; under torchrun each process calls this."""
    env = dist_env_from_environ()
    device = resolve_device(cfg.device, env.local_rank)
    if env.is_main and not cfg.eval_only:
        check_out_dir(Path(cfg.out_dir).expanduser())
    env = init_distributed(device, cfg.backend)
    done = False
    try:
        trainer = Trainer(cfg, device, env, finetune=finetune)
        if env.is_main and not cfg.eval_only:  # the first write: nothing on disk changes until the setup worked
            trainer.out_dir.mkdir(parents=True, exist_ok=True)
            (trainer.out_dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
        result = trainer.run()
        del trainer  # the DDP/FSDP wrappers go before the process group (see cleanup_distributed)
        done = True
        return result
    finally:
        cleanup_distributed(barrier=done)
