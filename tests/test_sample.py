"""`ngpt sample`: seeds, stop conditions, streamed text, prompt forms, output modes, bad input.

The decoding loop it runs (KV cache, sampling filters) is tested in test_generate.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli.cli import app
from nanogpt_cli.config import SampleConfig, TrainConfig, build
from nanogpt_cli.sample import TextStream, generate_samples, load_for_sampling
from tests.conftest import TINY, write_char_dataset

runner = CliRunner()  # click >= 8.2: result.stdout and result.stderr are kept apart (result.output mixes them)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine (idle threads spin and wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A tiny trained char-level checkpoint (block_size 32), made once for the module."""
    from nanogpt_cli.train import train

    root = tmp_path_factory.mktemp("sample")
    write_char_dataset(root / "data")
    out = root / "run"
    train(build(TrainConfig, None, [*TINY, f"--data_dir={root / 'data'}", f"--out_dir={out}", "--max_iters=4"]))
    return str(out)


def ngpt(*args: str, input: str | None = None, code: int = 0):
    result = runner.invoke(app, list(args), input=input)
    assert result.exit_code == code, (args, result.exit_code, result.stdout[-1000:], result.stderr[-1000:],
                                      repr(result.exception))
    return result


def base(run: str, *extra: str) -> list[str]:
    return ["sample", f"--out_dir={run}", "--device=cpu", "--max_new_tokens=40", *extra]


# ---------------------------------------------------------------- seeds


def test_seed_reproduces_and_greedy_ignores_it(run):
    first = ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=3", "--seed=7", "--temperature=1.0")).stdout
    again = ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=3", "--seed=7", "--temperature=1.0")).stdout
    other = ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=3", "--seed=8", "--temperature=1.0")).stdout
    assert first == again and first != other
    greedy = {ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=1", f"--seed={s}", "--temperature=0")).stdout
              for s in (1, 2)}
    assert len(greedy) == 1


# ---------------------------------------------------------------- stopping


def test_stop_string_ends_each_sample_of_a_batch_separately(run):
    args = base(run, "--prompt=ROMEO:", "--num_samples=4", "--temperature=1.0", "--top_k=0", "--seed=3",
                "--max_new_tokens=120", "--json")
    full = json.loads(ngpt(*args).stdout)
    stopped = json.loads(ngpt(*args, "--stop", "e").stdout)
    assert len(stopped["samples"]) == 4
    for whole, cut, reason in zip(full["samples"], stopped["samples"], stopped["finish_reasons"], strict=True):
        continuation = whole[len("ROMEO:"):]
        at = continuation.find("e")
        assert cut == "ROMEO:" + (continuation[:at] if at >= 0 else continuation)
        assert reason == ("stop" if at >= 0 else "length")
    assert "stop" in stopped["finish_reasons"]
    assert len({len(s) for s in stopped["samples"]}) > 1  # each sample stopped at its own place


def test_stop_at_eot_per_sample(run):
    model, tokenizer, device, dtype = load_for_sampling(build(SampleConfig, None, [f"--out_dir={run}",
                                                                                    "--device=cpu"]))
    tokenizer.eot_token = tokenizer.stoi["e"]  # pretend "e" is <|endoftext|>
    cfg = build(SampleConfig, None, ["--num_samples=3", "--max_new_tokens=150", "--temperature=1.0", "--top_k=0"])
    result = generate_samples(model, tokenizer, "ROMEO:", cfg, device, dtype)
    assert all("e" not in s[len("ROMEO:"):] for s in result.samples)
    assert result.finish_reasons.count("eot") >= 2
    cfg.stop_at_eot = False
    result = generate_samples(model, tokenizer, "ROMEO:", cfg, device, dtype)
    assert set(result.finish_reasons) == {"length"} and any("e" in s[6:] for s in result.samples)


def test_text_stream_holds_back_partial_stop_and_split_characters():
    pieces = {0: b"ab", 1: b"\n", 2: b"c", 3: b"\n\n", 4: "é".encode()[:1], 5: "é".encode()[1:]}
    stream = TextStream(pieces.__getitem__, stop="\n\n")
    assert [stream.push(t) for t in (0, 1, 2, 1)] == ["ab", "", "\nc", ""]  # "\n" might start the stop string
    assert stream.push(1) == "" and stream.done and stream.text == "ab\nc"
    stream = TextStream(pieces.__getitem__)
    assert [stream.push(t) for t in (4, 5, 4)] == ["", "é", ""] and stream.finish() == "\ufffd"


def test_tokens_arrive_one_at_a_time(run):
    model, tokenizer, device, dtype = load_for_sampling(build(SampleConfig, None, [f"--out_dir={run}",
                                                                                    "--device=cpu"]))
    calls = []
    cfg = build(SampleConfig, None, ["--num_samples=2", "--max_new_tokens=50", "--stop_at_eot"])
    result = generate_samples(model, tokenizer, "JULIET:", cfg, device, dtype, on_token=lambda i, t: calls.append(
        (i, t)))
    for i in (0, 1):
        texts = [t for j, t in calls if j == i]
        assert len(texts) == 50 and "JULIET:" + "".join(texts) == result.samples[i]
    assert result.new_tokens == 100 and result.tokens_per_second > 0


def test_generation_continues_past_block_size_with_and_without_cache(run):
    for cache in ("--use_cache", "--no-use_cache"):
        data = json.loads(ngpt(*base(run, "--max_new_tokens=100", "--num_samples=2", cache, "--json")).stdout)
        assert [len(s) for s in data["samples"]] == [101, 101]  # a newline prompt + 100 characters


# ---------------------------------------------------------------- prompts and output


def test_prompt_forms(run, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("MENENIUS:", encoding="utf-8")
    forms = {
        "--prompt": (["--prompt", "ROMEO:"], None, "ROMEO:"),
        "--start": (["--start=JULIET:"], None, "JULIET:"),
        "--prompt-file": (["--prompt-file", str(prompt_file)], None, "MENENIUS:"),
        "--start=FILE:": ([f"--start=FILE:{prompt_file}"], None, "MENENIUS:"),
        "--prompt -": (["--prompt", "-"], "First Citizen:", "First Citizen:"),
        "--prompt-file -": (["--prompt-file", "-"], "JULIET:\n", "JULIET:\n"),
        "--start=FILE:-": (["--start=FILE:-"], "ROMEO:", "ROMEO:"),
        "default": ([], None, "\n"),
    }
    for name, (args, stdin, prompt) in forms.items():
        data = json.loads(ngpt(*base(run, "--num_samples=1", "--json", *args), input=stdin).stdout)
        assert data["prompt"] == prompt and data["samples"][0].startswith(prompt), name
        assert len(data["samples"][0]) == len(prompt) + 40, name


def test_one_sample_streams_and_speed_goes_to_stderr(run):
    result = ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=1"))
    assert result.stdout.startswith("ROMEO:") and result.stdout.endswith("\n")
    assert len(result.stdout) == len("ROMEO:") + 40 + 1
    assert "tokens/s" in result.stderr and "tokens/s" not in result.stdout
    assert "tokens/s" not in ngpt("--quiet", *base(run, "--prompt=ROMEO:", "--num_samples=1")).stderr


def test_several_samples_are_shown_apart(run):
    out = ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=3")).stdout
    headers = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert headers == ["--- sample 1/3 ---", "--- sample 2/3 ---", "--- sample 3/3 ---"]
    assert out.count("ROMEO:") == 3


def test_json_output(run):
    data = json.loads(ngpt(*base(run, "--prompt=ROMEO:", "--num_samples=2", "--json")).stdout)
    assert set(data) >= {"prompt", "samples", "new_tokens", "seconds", "tokens_per_second", "finish_reasons"}
    assert len(data["samples"]) == 2 and data["new_tokens"] == 80 and data["tokens_per_second"] > 0


def test_interactive_loop(run):
    result = ngpt(*base(run, "--interactive", "--num_samples=1"), input="ROMEO:\nJULIET:\n\nMENENIUS:\n")
    assert result.stdout.startswith("ROMEO:") and result.stdout.count("\nJULIET:") == 1
    assert "MENENIUS" not in result.stdout  # an empty line ends the loop
    assert result.stderr.count("tokens/s") == 2
    result = ngpt(*base(run, "-i", "--json", "--num_samples=2"), input="ROMEO:\nexit\nJULIET:\n")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["ROMEO:"] and len(rows[0]["samples"]) == 2
    ngpt(*base(run, "--interactive"), input="")  # EOF at once: nothing to do, exit 0
    # a refused prompt says why and the loop goes on; the exit code then says something was refused
    result = ngpt(*base(run, "-i", "--num_samples=1"), input="ROMEO\u03a9\nJULIET:\n", code=2)
    assert result.stdout.startswith("JULIET:")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "character 'Ω' is not in this model's" in errors[0], result.stderr


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt=caf\u00e9"], "character 'é' is not in this model's"),
    (["--top_p=0"], "--top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top_p must be in (0, 1]"),
    (["--temperature=-0.5"], "--temperature must not be negative"),
    (["--max-new-tokens", "0"], "--max_new_tokens must be positive"),
    (["--stop="], "--stop is empty"),
    (["--interactive", "--prompt=ROMEO:"], "--interactive reads its prompts from stdin"),
    (["--prompt", "-"], "the prompt read from stdin is empty"),
    (["--prompt-file", "-"], "the prompt read from stdin is empty"),
])
def test_bad_input_is_one_error_line_and_exit_2(run, args, message):
    result = runner.invoke(app, ["sample", f"--out_dir={run}", "--device=cpu", *args], input="")
    assert result.exit_code == 2, (args, result.stdout, result.stderr)
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


def test_several_samples_grow_live_on_a_terminal(run, monkeypatch):
    """On a terminal a batch streams: every sample's tokens appear under its header as they arrive."""
    import io

    from rich.console import Console

    from nanogpt_cli import progress
    from nanogpt_cli import sample as sample_module
    from nanogpt_cli.config import SampleConfig
    from nanogpt_cli.sample import Sampler, _show_one

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=60, height=40)
    monkeypatch.setattr(progress, "out", terminal)
    monkeypatch.setattr(progress, "is_interactive", lambda: True)
    monkeypatch.setattr(sample_module, "LIVE_REFRESH_S", 0.0)  # redraw after every step
    sampler = Sampler(build(SampleConfig, None, [f"--out_dir={run}", "--device=cpu", "--max_new_tokens=30",
                                                 "--num_samples=2"]))
    frames = []
    generate = sampler.generate

    def watched(prompt, on_token=None, on_step=None):
        def step_and_look(n):
            on_step(n)
            frames.append(screen.getvalue())

        return generate(prompt, on_token=on_token, on_step=step_and_look)

    monkeypatch.setattr(sampler, "generate", watched)
    result = _show_one(sampler, "ROMEO:", as_json=False)
    assert len(frames) == 30 and all(sample.startswith("ROMEO:") for sample in result.samples)
    # mid-generation, both headers are on screen, and each sample's first tokens already are
    middle = frames[15]
    assert "sample 1/2" in middle and "sample 2/2" in middle
    for sample in result.samples:
        assert sample[:len("ROMEO:") + 10] in middle
    assert len(frames[29]) > len(frames[5])  # the view grew as tokens arrived


def terminal(output: str, height: int) -> tuple[list[str], int]:
    """What a terminal of `height` rows, its cursor at the top, shows after this output, and how many lines
    it pushed into its scrollback (a newline on the bottom row scrolls). Knows the codes rich's Live writes:
    carriage return, cursor up, erase line; other control codes (styles, cursor visibility) change nothing."""
    rows, row, col, lost = [""], 0, 0, 0
    for text, count, code, control in re.findall(r"([^\x1b\r\n]+)|\x1b\[\??(\d*)([A-Za-z])|([\r\n])", output):
        if text:
            rows[row] = rows[row][:col].ljust(col) + text + rows[row][col + len(text):]
            col += len(text)
        elif control == "\r":
            col = 0
        elif control == "\n":
            row, col = row + 1, 0
            if row == height:
                rows, row, lost = rows[1:], height - 1, lost + 1
            rows += [""] * (row + 1 - len(rows))
        elif code == "A":
            row = max(0, row - int(count or 1))
        elif code == "K":
            rows[row] = ""
    return rows, lost


def test_a_batch_taller_than_the_screen_streams_what_fits_and_then_prints_every_sample_whole(run, monkeypatch):
    import io

    from rich.console import Console

    from nanogpt_cli import progress
    from nanogpt_cli import sample as sample_module
    from nanogpt_cli.config import SampleConfig
    from nanogpt_cli.sample import Sampler, _show_one

    screen = io.StringIO()
    tty = Console(file=screen, force_terminal=True, width=40, height=8)
    monkeypatch.setattr(progress, "out", tty)
    monkeypatch.setattr(progress, "is_interactive", lambda: True)
    monkeypatch.setattr(progress, "echo", screen.write)
    monkeypatch.setattr(sample_module, "LIVE_REFRESH_S", 0.0)
    sampler = Sampler(build(SampleConfig, None, [f"--out_dir={run}", "--device=cpu", "--max_new_tokens=150",
                                                 "--num_samples=3"]))
    frames, live = [], []  # the screen as each token step redrew it; all the live view wrote, its end included
    generate, stream_batch = sampler.generate, sample_module._stream_batch

    def watched(prompt, on_token=None, on_step=None):
        def step_and_look(n):
            on_step(n)
            frames.append(screen.getvalue())

        return generate(prompt, on_token=on_token, on_step=step_and_look)

    def streamed(*args):
        result = stream_batch(*args)
        live.append(screen.getvalue())
        return result

    monkeypatch.setattr(sampler, "generate", watched)
    monkeypatch.setattr(sample_module, "_stream_batch", streamed)
    result = _show_one(sampler, "ROMEO:", as_json=False)
    rows = sum(len(line) // 40 + 1 for sample in result.samples for line in sample.split("\n"))
    assert rows + 3 > 2 * 8  # the samples and their headers: twice the screen
    shown, _ = terminal(frames[-1], height=8)
    assert all(any(f"sample {i}/3" in row for row in shown) for i in (1, 2, 3))  # every sample on screen
    assert any(row.endswith(result.samples[2].split()[-1][-40:]) for row in shown)  # with its newest text
    cleared, lost = terminal(live[0], height=8)
    assert lost == 0 and not any(cleared)  # nothing scrolled away, and what was shown is gone
    printed = re.sub(r"\x1b\[[\d;?]*[A-Za-z]", "", screen.getvalue()[len(live[0]):])  # after the live view:
    for i, sample in enumerate(result.samples, 1):  # every sample, whole
        assert f"sample {i}/3" in printed and sample in printed


def test_compile_on_cpu_says_what_it_costs_decoding(tmp_path, monkeypatch, bpe_files):
    import dataclasses

    import torch

    from nanogpt_cli.config import SampleConfig, build
    from nanogpt_cli.model import GPT, GPTConfig
    from nanogpt_cli.sample import load_for_sampling

    config = GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)
    torch.save({"model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config), "format": "ngpt/1",
                "meta": {"tokenizer": "gpt2", "vocab_size": 50257}, "iter_num": 0}, tmp_path / "ckpt.pt")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)  # the note, not the compile
    printed = []
    import nanogpt_cli.progress as progress

    monkeypatch.setattr(progress.console, "print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
    for use_cache, noted in ((True, True), (False, False)):
        printed.clear()
        cfg = build(SampleConfig, None, [f"--out_dir={tmp_path}", "--device=cpu", "--compile=True",
                                         f"--use_cache={use_cache}"])
        load_for_sampling(cfg)
        assert any("compiles again as the KV cache grows" in line for line in printed) == noted
    assert len(compiled) == 2
