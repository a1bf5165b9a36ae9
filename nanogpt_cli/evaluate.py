"""Loss, perplexity and bits per byte of a model on the splits of a prepared dataset, and the `ngpt eval`
command's run.

Bits per byte compare models whatever their tokenizers: the summed cross-entropy of the targets, in bits,
over the UTF-8 bytes of the text those targets stand for (the loader's `token_bytes`; <|endoftext|> stands
for none, though predicting it costs bits). A char-level model of ASCII text has one byte per token, so its
bits per byte are its loss / ln 2.

    ngpt eval --init_from=resume --out_dir=out/shakespeare-char --dataset=shakespeare_char
    ngpt eval --preset eval-gpt2
    ngpt eval --init_from=gpt2 --task hellaswag --task lambada      # zero-shot benchmarks (zeroshot.py)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from nanogpt_cli.config import TrainConfig
from nanogpt_cli.data import SPLITS
from nanogpt_cli.distributed import DistEnv, any_rank
from nanogpt_cli.runtime import autocast, plan


@torch.no_grad()
def evaluate_loss(model, loader, eval_iters: int, device: torch.device, dtype: str, seed: int | None,
                  env: DistEnv | None = None, splits=("train", "val"), should_stop=None) -> dict[str, float] | None:
    """Mean loss over eval_iters batches per split ({"train": ..., "val": ...}), and each split's bits per byte
    ("train_bpb", "val_bpb") when the loader knows its tokens' bytes: the batches are the next ones of the
    loader's stream (training evaluates on its own stream, as nanoGPT does) or, with a seed, of a generator
    seeded by it (the loader's state is restored afterwards). Every process draws all eval_iters; process r
    evaluates those r, r + W, ... and the sums are added up. Every process runs the same number of forwards
    (FSDP's are collectives): one without a batch of its own in the last group runs the group's first and does
    not count it. `should_stop()` is asked before each batch (all ranks agree on its answer): True ends the
    evaluation at once, returning None."""
    env = env or DistEnv()
    was_training = model.training
    model.eval()
    state = loader.state_dict()
    sum_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # mps has no float64
    token_bytes = loader.token_bytes.to(device) if loader.token_bytes is not None else None
    losses = {}
    for i, split in enumerate(splits):
        if seed is not None:
            loader.generator.manual_seed(seed + 104729 * i)
        total = torch.zeros(4, device=device, dtype=sum_dtype)  # (sum of mean losses, batches, nats, bytes)
        for first in range(0, eval_iters, env.world_size):
            if should_stop is not None and any_rank(should_stop(), env, device):
                model.train(was_training)
                return None
            group = [loader.pick(split) for _ in range(min(env.world_size, eval_iters - first))]
            mine = env.rank < len(group)
            X, Y = loader.batch(split, group[env.rank if mine else 0])
            with autocast(device, dtype):
                _, loss = model(X, Y)
            if mine:
                total[0] += loss.to(sum_dtype)
                total[1] += 1
                if token_bytes is not None:
                    total[2] += loss.to(sum_dtype) * Y.numel()  # the batch's summed cross-entropy
                    total[3] += token_bytes[Y].sum()
        if env.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
        losses[split] = (total[0] / total[1]).item()
        if token_bytes is not None and total[3] > 0:
            losses[f"{split}_bpb"] = (total[2] / (total[3] * math.log(2))).item()
    if seed is not None:
        loader.load_state_dict(state)
    model.train(was_training)
    return losses


def evaluate(cfg: TrainConfig, loaded: tuple | None = None, dataset_named: bool = True) -> dict:
    """Loss and perplexity per split for cfg.init_from (an ngpt checkpoint or any importable model);
    `loaded`: its (model, meta, checkpoint) when the caller has loaded it already. An ngpt run is evaluated on
    its own dataset unless `dataset_named` (the command line named one)."""
    from nanogpt_cli.checkpoint import load_model
    from nanogpt_cli.data import BatchLoader, check_vocabulary, dataset_path, load_meta
    from nanogpt_cli.errors import UsageError
    from nanogpt_cli.precision import cpu_linears

    runtime = plan(cfg.device, cfg.dtype)
    device, dtype = runtime.device, runtime.dtype
    if cfg.init_from == "scratch":
        raise UsageError("ngpt eval needs weights: --init_from=resume (with --out_dir), a checkpoint, or gpt2*")
    model, meta, ckpt = loaded or load_model(cfg.init_from, cfg.out_dir)
    trained_on = (ckpt or {}).get("config") or {}
    if not dataset_named and trained_on.get("dataset"):
        cfg = dataclasses.replace(cfg, dataset=trained_on["dataset"],
                                  data_dir=cfg.data_dir or trained_on.get("data_dir"))
    folder = dataset_path(cfg.dataset, cfg.data_dir)
    data_meta = load_meta(folder)
    check_vocabulary(data_meta, meta, model.config.vocab_size, cfg.dataset)
    block_size = min(cfg.block_size or model.config.block_size, model.config.block_size)
    model = cpu_linears(model.to(device), device)
    loader = BatchLoader(folder, data_meta, cfg.batch_size, block_size, device, cfg.seed)
    losses = evaluate_loss(model, loader, cfg.eval_iters, device, dtype, cfg.seed)
    return {
        "model": cfg.init_from if cfg.init_from != "resume" else cfg.out_dir,
        "dataset": cfg.dataset,
        "block_size": block_size,
        "tokens_per_split": cfg.eval_iters * cfg.batch_size * block_size,
        **{f"{split}_loss": losses[split] for split in SPLITS},
        **{f"{split}_perplexity": math.exp(losses[split]) for split in SPLITS},
        **{f"{split}_bpb": losses[f"{split}_bpb"] for split in SPLITS if f"{split}_bpb" in losses},
    }


def run_eval(cfg: TrainConfig, tasks: list[str], files: dict[str, str | None] | None = None,
             limit: int | None = None, dataset_named: bool = False) -> dict:
    """`ngpt eval`: the dataset's loss and perplexity and the zero-shot results of each task, in one dict.

    init_from=scratch means this out_dir's checkpoint. With tasks, the dataset is evaluated only when
    `dataset_named` (a preset's default dataset may not be prepared); `files` maps a task to a local copy
    of its benchmark, and `limit` scores only the first examples of each."""
    from nanogpt_cli.errors import UsageError
    from nanogpt_cli.zeroshot import benchmark_file, zeroshot

    if limit is not None and not tasks:
        raise UsageError("--limit applies to the zero-shot benchmarks: add --task hellaswag or --task lambada")
    files = files or {}
    if cfg.init_from == "scratch":
        cfg = dataclasses.replace(cfg, init_from="resume")
    wants_dataset_loss = not tasks or dataset_named
    loaded = None
    if tasks and wants_dataset_loss:  # both: the model is loaded once, after the benchmark files are found
        from nanogpt_cli.checkpoint import load_model

        for name in tasks:
            benchmark_file(name, files.get(name))
        loaded = load_model(cfg.init_from, cfg.out_dir)
    report = evaluate(cfg, loaded, dataset_named) if wants_dataset_loss else {}
    if tasks:
        report = {**report, **zeroshot(cfg, tasks, files, limit, loaded and loaded[:2])}
    return report
