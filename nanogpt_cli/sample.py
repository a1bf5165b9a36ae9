"""Generation from a trained checkpoint or pretrained GPT-2, with a KV cache.

    ngpt sample --out-dir out/shakespeare-char --prompt "ROMEO:" --num-samples 3
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt_cli.checkpoint import load_model
from nanogpt_cli.config import SampleConfig
from nanogpt_cli.device import autocast, choose_dtype, resolve_device, synchronize
from nanogpt_cli.errors import UsageError
from nanogpt_cli.tokenizer import from_meta


@dataclass
class SampleResult:
    samples: list[str]
    prompt: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def read_prompt(cfg: SampleConfig) -> str:
    """--prompt TEXT | --prompt - (stdin) | --prompt-file PATH | --start TEXT | --start FILE:path."""
    given = [name for name in ("prompt", "start", "prompt_file") if getattr(cfg, name) is not None]
    if len(given) > 1:
        raise UsageError(f"give one of --prompt, --start and --prompt_file, not {' and '.join(given)}")
    text, path = cfg.prompt if cfg.prompt is not None else cfg.start, cfg.prompt_file
    if text is not None and text.startswith("FILE:"):
        path = text[len("FILE:"):]
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"prompt file {path!r} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"prompt file {path!r} is not UTF-8 text (byte {e.start})") from None
        if not text:
            raise UsageError(f"prompt file {path!r} is empty")
    elif text == "-":
        text = sys.stdin.read()
        if not text:
            raise UsageError("the prompt read from stdin is empty")
    elif text is None:
        text = "\n"
    if text == "":
        raise UsageError("the prompt is empty; leave --prompt out to start from a newline")
    return text


def generate_samples(model, tokenizer, prompt: str, cfg: SampleConfig, device: torch.device, dtype: str,
                     on_token=None) -> SampleResult:
    """num_samples continuations of `prompt`, generated as one batch.

    on_token(i, text) is called with each sample's newly decoded text as it is produced.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    x = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    eot = tokenizer.eot_token if cfg.stop_at_eot else None
    top_k = cfg.top_k or None
    out_ids: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    emitted = [""] * cfg.num_samples  # text already handed to on_token
    done = [False] * cfg.num_samples
    start = time.perf_counter()
    produced = 0
    with torch.no_grad(), autocast(device, dtype):
        for column in model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=top_k,
                                     top_p=cfg.top_p, generator=generator, use_cache=cfg.use_cache):
            produced += cfg.num_samples
            for i, token in enumerate(column[:, 0].tolist()):
                if done[i]:
                    continue
                if eot is not None and token == eot:
                    done[i] = True
                    continue
                out_ids[i].append(token)
                text = tokenizer.decode(out_ids[i])
                if cfg.stop and cfg.stop in text:
                    text, done[i] = text[:text.index(cfg.stop)], True
                if text.endswith("\ufffd") and not done[i]:
                    continue  # a multi-byte character is still arriving
                if on_token and len(text) > len(emitted[i]):
                    on_token(i, text[len(emitted[i]):])
                emitted[i] = text
            if all(done):
                break
    synchronize(device)
    texts = [emitted[i] if done[i] else tokenizer.decode(ids) for i, ids in enumerate(out_ids)]
    return SampleResult([prompt + t for t in texts], prompt, produced, time.perf_counter() - start)


def load_for_sampling(cfg: SampleConfig):
    device = resolve_device(cfg.device)
    dtype, _ = choose_dtype(device, cfg.dtype)
    model, meta, _ = load_model(cfg.init_from, cfg.out_dir)
    model.eval().to(device)
    if cfg.compile:
        model = torch.compile(model)
    return model, from_meta(meta), device, dtype


def sample(cfg: SampleConfig, on_token=None) -> SampleResult:
    prompt = read_prompt(cfg)
    model, tokenizer, device, dtype = load_for_sampling(cfg)
    return generate_samples(model, tokenizer, prompt, cfg, device, dtype, on_token)
