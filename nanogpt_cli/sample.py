"""Generation from a trained checkpoint or pretrained GPT-2, with a KV cache.

    ngpt sample --out-dir out/shakespeare-char --prompt "ROMEO:" --num-samples 3
    echo "JULIET:" | ngpt sample --out-dir out/shakespeare-char --prompt - --num-samples 1
    ngpt sample --init_from=gpt2 --interactive --max-new-tokens 60

The prompt is prefilled once and each step decodes one token against cached keys and values
(`nanogpt_cli.generate.Generation`, the decoding loop); text is decoded incrementally, token by
token, so a long sample costs no more per token than a short one. Several samples are one batch.
Samples go to stdout; the tokens/s line and any prompt marker go to stderr.
"""

from __future__ import annotations

import codecs
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanogpt_cli.checkpoint import load_model
from nanogpt_cli.config import SampleConfig, ServeConfig
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.generate import Generation
from nanogpt_cli.limits import check_sampling_fits
from nanogpt_cli.precision import check_precision, for_inference
from nanogpt_cli.runtime import autocast, plan, synchronize
from nanogpt_cli.tokenizer import from_meta


@dataclass
class SampleResult:
    samples: list[str]  # prompt + continuation, one per sample
    prompt: str
    new_tokens: int  # tokens generated, all samples of the batch together
    seconds: float
    finish_reasons: list[str] = field(default_factory=list)  # per sample: "length", "eot" or "stop"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "samples": self.samples, "finish_reasons": self.finish_reasons,
                "new_tokens": self.new_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 2)}


MAX_PROMPT_BYTES = 10_000_000  # far past any context; bounds what a prompt file or stdin can make us read


def read_prompt(cfg: SampleConfig) -> str:
    """--prompt TEXT | --prompt - (stdin) | --prompt-file PATH | --start TEXT | --start FILE:path;
    `-` for a file is stdin too."""
    given = [name for name in ("prompt", "start", "prompt_file") if getattr(cfg, name) is not None]
    if len(given) > 1:
        raise UsageError(f"give one of --prompt, --start and --prompt_file, not {' and '.join(given)}")
    text, path = cfg.prompt if cfg.prompt is not None else cfg.start, cfg.prompt_file
    if text is not None and text.startswith("FILE:"):
        path = text[len("FILE:"):]
    if path == "-":  # --prompt-file - and --start=FILE:- read stdin, as --prompt - does
        path, text = None, "-"
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"prompt file {path!r} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
        if file.stat().st_size > MAX_PROMPT_BYTES:
            raise UsageError(f"prompt file {path!r} is {file.stat().st_size:,} bytes, more than the "
                             f"{MAX_PROMPT_BYTES:,} a prompt may have (the model sees only its last block_size tokens)")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"prompt file {path!r} is not UTF-8 text (byte {e.start})") from None
        if not text:
            raise UsageError(f"prompt file {path!r} is empty")
    elif text == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise UsageError("--prompt - reads the prompt from stdin, but stdin is closed")
        text = sys.stdin.read(MAX_PROMPT_BYTES + 1)
        if len(text) > MAX_PROMPT_BYTES:
            raise UsageError(f"the prompt read from stdin is longer than the {MAX_PROMPT_BYTES:,} characters a "
                             "prompt may have")
        if not text:
            raise UsageError("the prompt read from stdin is empty")
    elif text is None:
        text = "\n"
    if text == "":
        raise UsageError("the prompt is empty; leave --prompt out to start from a newline")
    return text


def token_bytes(tokenizer):
    """A function from one token id to its bytes (text is decoded incrementally from these)."""
    enc = getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "decode_single_token_bytes"):
        return enc.decode_single_token_bytes
    itos = getattr(tokenizer, "itos", None)
    if itos is not None:
        table = [c.encode("utf-8") for c in itos]
        return table.__getitem__
    return lambda token: tokenizer.decode([token]).encode("utf-8")


class TextStream:
    """One sample's text, decoded token by token (O(1) work per token, not a decode of the whole text).

    `push` returns the text that is now final: a character whose bytes are still arriving is
    held back, and so is a tail that could be the start of a stop string, so streamed text
    never has to be taken back. Stop strings (one, or a list) are searched in the generated text
    only; the text ends before the first one to appear.
    """

    def __init__(self, to_bytes, stop: str | list[str] | None = None):
        self.to_bytes = to_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
        self.text = ""
        self.emitted = 0
        self.done = False
        self.stopped = False  # a stop string was found

    def _add(self, piece: str) -> None:
        before = len(self.text)
        self.text += piece
        hits = [hit for stop in self.stops if (hit := self.text.find(stop, max(0, before - len(stop) + 1))) >= 0]
        if hits:
            self.text, self.done, self.stopped = self.text[:min(hits)], True, True

    def _release(self, end: int) -> str:
        new = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return new

    def push(self, token: int) -> str:
        self._add(self.decoder.decode(self.to_bytes(token)))
        if self.done or not self.stops:
            return self._release(len(self.text))
        held = 0  # the longest tail of the text that is a proper prefix of a stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return self._release(len(self.text) - held)

    def finish(self) -> str:
        """End the sample (length reached, or <|endoftext|>): flush whatever was held back."""
        if not self.done:
            self._add(self.decoder.decode(b"", final=True))
            self.done = True
        return self._release(len(self.text))


class RequestText:
    """The texts of a `Request`'s rows as its columns arrive: `take(column)` returns the (row, text) pieces that
    are now final. A row whose text reaches a stop string is finished with "stop"; a row that sampled the stop
    token ("eot") ends without that token's text. `tokens[row]` counts the tokens of the row's output."""

    def __init__(self, request, to_bytes, stop: str | list[str] | None = None):
        self.request = request
        self.streams = [TextStream(to_bytes, stop) for _ in range(request.n)]
        self.tokens = [0] * request.n

    def take(self, column) -> list[tuple[int, str]]:
        pieces = []
        for row, token in enumerate(column[:, 0].tolist()):
            stream = self.streams[row]
            if stream.done:  # this row ended at an earlier step
                continue
            self.tokens[row] += 1
            if self.request.finish_reasons[row] == "eot":  # ended at this token, which has no text
                text = stream.finish()
            else:
                text = stream.push(token)
                if stream.stopped:
                    self.request.finish(row, "stop")
            if text:
                pieces.append((row, text))
        return pieces

    def finish(self) -> list[tuple[int, str]]:
        """The text every row still holds back, once the request is done."""
        return [(row, text) for row, stream in enumerate(self.streams) if (text := stream.finish())]


def load_for_sampling(cfg: SampleConfig | ServeConfig):
    """(model, tokenizer, device, dtype) for inference: the model of cfg.init_from / cfg.out_dir in eval mode on the
    runtime's device, its weights in the runtime's dtype (and int8 with cfg.quantize), compiled if cfg.compile."""
    runtime = plan(cfg.device, cfg.dtype)
    check_precision(runtime.device, runtime.dtype, cfg.quantize)  # before the model loads: bad input fails fast
    model, meta, _ = load_model(cfg.init_from, cfg.out_dir, mmap=True)  # nothing here saves over the file
    rows = cfg.max_batch if isinstance(cfg, ServeConfig) else cfg.num_samples  # decoded together each step
    model = for_inference(model, runtime.device, runtime.dtype, cfg.quantize, rows)
    if cfg.compile:
        if runtime.device.type == "cpu" and getattr(cfg, "use_cache", True):  # serve always decodes with it
            from nanogpt_cli.progress import console

            console.print("note: --compile compiles again as the KV cache grows; on a CPU decoding measured 20x "
                          "slower with it (18 s to the first token of GPT-2 124M, then 394 ms a token)",
                          markup=False, highlight=False)
        model = torch.compile(model)
    return model, from_meta(meta), runtime.device, runtime.dtype


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; a character outside a char-level vocabulary is a usage error naming it."""
    if prompt == "":
        raise UsageError("the prompt is empty")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    return ids


def generate_samples(model, tokenizer, prompt: str, cfg: SampleConfig, device: torch.device, dtype: str,
                     on_token=None, generator: torch.Generator | None = None, on_step=None) -> SampleResult:
    """num_samples continuations of `prompt`, generated as one batch by `Generation`.

    on_token(i, text) is called with each sample's newly final text as it is produced;
    on_step(n) after the n-th decoding step. A sample ends at max_new_tokens, at
    <|endoftext|> (stop_at_eot; the token is not part of the text) or at the stop string
    (cut before it); the batch ends when every sample has.
    """
    ids = encode_prompt(tokenizer, prompt)
    n = cfg.num_samples
    check_sampling_fits(model.config, n, len(ids) + cfg.max_new_tokens, device)
    x = torch.tensor([ids] * n, dtype=torch.long, device=device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    eot = tokenizer.eot_token if cfg.stop_at_eot else None
    vocab = getattr(tokenizer, "vocab_size", None)  # the model's table may be padded (50257 -> 50304)
    generation = Generation(model, x, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p, generator,
                            cfg.use_cache, stop_token=eot, vocab_size=vocab)
    texts = RequestText(generation.request, token_bytes(tokenizer), cfg.stop)
    emit = on_token or (lambda i, text: None)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, dtype):
        for column in generation:
            for i, text in texts.take(column):
                emit(i, text)
            if on_step:
                on_step(generation.steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    for i, text in texts.finish():
        emit(i, text)
    return SampleResult([prompt + s.text for s in texts.streams], prompt, generation.steps * n, seconds,
                        generation.finish_reasons)


class Sampler:
    """A loaded model and tokenizer, ready for several prompts (`--interactive`).

    One random generator, seeded once, serves every prompt: a session is reproducible
    as a whole, and asking the same prompt twice gives two different samples.
    """

    def __init__(self, cfg: SampleConfig):
        self.cfg = cfg
        self.model, self.tokenizer, self.device, self.dtype = load_for_sampling(cfg)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)

    def check(self, prompt: str) -> None:
        encode_prompt(self.tokenizer, prompt)

    def generate(self, prompt: str, on_token=None, on_step=None) -> SampleResult:
        return generate_samples(self.model, self.tokenizer, prompt, self.cfg, self.device, self.dtype, on_token,
                                self.generator, on_step)


# ---------------------------------------------------------------- the `ngpt sample` command's output

def _report_speed(result: SampleResult, cfg: SampleConfig) -> None:
    from nanogpt_cli.progress import console

    cache = "KV cache" if cfg.use_cache else "no KV cache"
    console.print(f"{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:,.1f} tokens/s "
                  f"({cfg.num_samples} sample{'s' if cfg.num_samples > 1 else ''}, {cache})",
                  style="dim", markup=False, highlight=False)


LIVE_REFRESH_S = 0.1  # how often a streaming batch redraws


class _OnScreen:
    """A streaming batch's view: each sample under its header, cut to fit the screen. A live view taller
    than the screen scrolls at every redraw and leaves a cut copy of its top in the scrollback, so when the
    samples do not fit, each keeps its header and its newest lines, all together a line less than the screen
    (the line the cursor rests on)."""

    def __init__(self, headers: list, texts: list):
        self.headers, self.texts = headers, texts

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        room = max(1, options.size.height - 1)
        blocks = [(console.render_lines(header, options, pad=False), console.render_lines(text, options, pad=False))
                  for header, text in zip(self.headers, self.texts, strict=True)]
        if sum(len(header) + len(text) for header, text in blocks) > room:
            keep = room // len(blocks) - 1  # text lines under each header
            blocks = [(header, text[-keep:] if keep > 0 else []) for header, text in blocks]
        for line in [line for header, text in blocks for line in (*header, *text)][:room]:
            yield from line
            yield Segment.line()


def _stream_batch(sampler: Sampler, prompt: str) -> SampleResult:
    """Generate a batch with every sample growing on the terminal under its header as its tokens arrive
    (rich Live, cut to the screen); the view is cleared at the end, for the full samples to be printed."""
    from rich.live import Live
    from rich.rule import Rule
    from rich.text import Text

    from nanogpt_cli.progress import out

    n = sampler.cfg.num_samples
    texts = [Text(prompt, no_wrap=False, overflow="fold") for _ in range(n)]  # wrapped, though `out` soft-wraps
    view = _OnScreen([Rule(Text(f"sample {i}/{n}")) for i in range(1, n + 1)], texts)
    last = [0.0]

    def redraw(step: int) -> None:  # between decoding steps, at most every LIVE_REFRESH_S
        now = time.perf_counter()
        if now - last[0] >= LIVE_REFRESH_S:
            live.refresh()
            last[0] = now

    with Live(view, console=out, auto_refresh=False, transient=True, vertical_overflow="crop") as live:
        return sampler.generate(prompt, on_token=lambda i, piece: texts[i].append(piece), on_step=redraw)


def _show_one(sampler: Sampler, prompt: str, as_json: bool) -> SampleResult:
    """Generate for one prompt and print it: streamed (one sample), JSON, or one section per sample."""
    from nanogpt_cli.progress import console, echo, is_interactive, out

    cfg = sampler.cfg
    sampler.check(prompt)  # a bad prompt fails before anything is printed
    if as_json:
        result = sampler.generate(prompt)
        echo(json.dumps(result.as_dict()) + "\n")
    elif cfg.num_samples == 1:  # one sample streams as it is generated
        echo(prompt)
        result = sampler.generate(prompt, on_token=lambda i, text: echo(text))
        echo("\n")
    else:  # several samples are one batch: each under its own header, growing live on a terminal
        if out.is_terminal and is_interactive():
            result = _stream_batch(sampler, prompt)
        elif is_interactive():
            with console.status(f"generating {cfg.num_samples} samples") as status:
                result = sampler.generate(prompt, on_step=lambda n: status.update(
                    f"generating {cfg.num_samples} samples: {n}/{cfg.max_new_tokens} tokens"))
        else:
            result = sampler.generate(prompt)
        for i, text in enumerate(result.samples, 1):
            if out.is_terminal:
                out.rule(f"sample {i}/{len(result.samples)}")
                echo(text + "\n")
            else:
                echo(f"--- sample {i}/{len(result.samples)} ---\n{text}\n")
    _report_speed(result, cfg)
    return result


def run_sample_command(cfg: SampleConfig, as_json: bool = False, interactive: bool = False) -> int:
    """`ngpt sample`: one prompt, or (interactive) a prompt per line of stdin until EOF, an empty line or
    `exit`. Returns the exit code: in interactive mode a refused prompt prints `error: ...` and the loop
    goes on, and the exit code is then 2."""
    from nanogpt_cli.progress import console

    if not interactive:
        prompt = read_prompt(cfg)
        _show_one(Sampler(cfg), prompt, as_json)
        return 0
    given = [f"--{name}" for name in ("prompt", "start", "prompt_file") if getattr(cfg, name) is not None]
    if given:
        raise UsageError(f"--interactive reads its prompts from stdin, one per line; leave out {', '.join(given)}")
    sampler = Sampler(cfg)
    tty = sys.stdin.isatty()
    if tty:
        console.print("one prompt per line; an empty line, 'exit' or Ctrl-D ends", style="dim", highlight=False)
    failed = False
    while True:
        if tty:  # the marker is part of the conversation, shown even with --quiet
            sys.stderr.write("prompt> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        prompt = line.rstrip("\r\n")
        if not line or prompt.strip() in ("", "exit", "quit"):
            return 2 if failed else 0
        try:
            _show_one(sampler, prompt, as_json)
        except NgptError as e:
            if not isinstance(e, UsageError):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed = True
