"""`ngpt serve`: the official openai client against a real uvicorn server on a free loopback port.

Greedy completions equal `ngpt sample --temperature 0`, alone and in a batch; seeded ones equal the decoding
loop's, under load; streams end in [DONE]; bad input is a 4xx with OpenAI's error body; the API key, the queue
cap (429) and disconnects; SIGTERM ends the requests in flight and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import missing, require_module

httpx = require_module("httpx")
openai = require_module("openai")
require_module("fastapi")  # the serve extra
require_module("uvicorn")

from nanogpt_cli.checkpoint import FORMAT  # noqa: E402
from nanogpt_cli.cli import app  # noqa: E402
from nanogpt_cli.config import ServeConfig, build  # noqa: E402
from nanogpt_cli.generate import BatchDecoder, Generation  # noqa: E402
from nanogpt_cli.model import GPT, GPTConfig  # noqa: E402
from nanogpt_cli.openai_api import render_chat  # noqa: E402
from nanogpt_cli.sample import load_for_sampling  # noqa: E402
from nanogpt_cli.serve import build_service, create_app, uvicorn_server  # noqa: E402

CHARS = sorted(set(string.printable) - set("\r\x0b\x0c"))  # every character a chat transcript needs
BLOCK = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A char-level checkpoint with random weights: a table padded past the vocabulary, a short block."""
    out = tmp_path_factory.mktemp("serve") / "run"
    out.mkdir()
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK, vocab_size=128, n_layer=2, n_head=2, n_embd=32)
    torch.save({"format": FORMAT, "model": GPT(config).state_dict(), "model_args": asdict(config),
                "meta": {"tokenizer": "char", "itos": CHARS, "vocab_size": len(CHARS)}}, out / "ckpt.pt")
    return str(out)


@contextlib.contextmanager
def serving(run: str, *options: str):
    """A server on a free port in a thread of this process, stopped (as Ctrl-C would) at the end."""
    cfg = build(ServeConfig, None, [f"--out_dir={run}", "--device=cpu", "--port=0", "--model_name=tiny", *options])
    model, tokenizer, device, dtype = load_for_sampling(cfg)
    ports: queue.Queue = queue.Queue()
    server = uvicorn_server(create_app(build_service(cfg, model, tokenizer, device, dtype)), "127.0.0.1", 0,
                            ports.put)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=30)}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def url(run):
    with serving(run, "--max_batch=8", "--max_n=4", "--max_tokens=200") as base:
        yield base


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def ngpt_sample_greedy(run: str, prompt: str, tokens: int) -> str:
    result = CliRunner().invoke(app, ["sample", f"--out_dir={run}", "--device=cpu", "--json", f"--prompt={prompt}",
                                      "--num_samples=1", f"--max_new_tokens={tokens}", "--temperature=0"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["samples"][0][len(prompt):]


@pytest.fixture(scope="module")
def loaded(run):
    model, tokenizer, _, _ = load_for_sampling(build(ServeConfig, None, [f"--out_dir={run}", "--device=cpu"]))
    return model, tokenizer


def decoded_alone(loaded, prompt: str, tokens: int, seed: int, n: int = 1) -> list[str]:
    """What the decoding loop gives for this prompt and seed (temperature 1) with nothing else in the batch."""
    model, tokenizer = loaded
    idx = torch.tensor([tokenizer.encode(prompt)] * n)
    generation = Generation(model, idx, tokens, 1.0, generator=torch.Generator().manual_seed(seed),
                            vocab_size=len(CHARS))
    columns = torch.cat(list(generation), 1)
    return [tokenizer.decode(row) for row in columns.tolist()]


# ---------------------------------------------------------------- the same text as ngpt sample, alone and batched


def test_greedy_completion_equals_ngpt_sample_alone_and_in_a_batch(run, url):
    prompts = ["ROMEO:", "a", "To be, or not to be: that is the question.", "x" * (BLOCK + 9)]  # the last: > block
    expected = [ngpt_sample_greedy(run, prompt, 50) for prompt in prompts]  # 50 tokens: past block_size
    api = client(url)
    alone = api.completions.create(model="tiny", prompt=prompts[0], max_tokens=50, temperature=0)
    assert alone.choices[0].text == expected[0] and alone.choices[0].finish_reason == "length"
    assert alone.usage.prompt_tokens == 6 and alone.usage.completion_tokens == 50 and alone.model == "tiny"

    def complete(i: int) -> str:  # the prompts join the batch at different steps
        time.sleep(0.02 * i)
        return api.completions.create(model="tiny", prompt=prompts[i], max_tokens=50, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(complete, range(len(prompts)))) == expected


def test_64_concurrent_seeded_requests_each_get_their_own_sample(loaded, url):
    """More requests than rows: they queue, join as rows free up, and each is what it would be alone."""
    api = client(url)
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\nBefore we proceed", "ab"]

    def complete(i: int):
        return api.completions.create(model="tiny", prompt=prompts[i % 4], max_tokens=12 + i % 5, seed=i,
                                      temperature=1.0, n=1 + i % 2)

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(complete, range(64)))
    for i, response in enumerate(responses):
        texts = [choice.text for choice in sorted(response.choices, key=lambda c: c.index)]
        assert texts == decoded_alone(loaded, prompts[i % 4], 12 + i % 5, seed=i, n=1 + i % 2), i
        assert response.usage.completion_tokens == (12 + i % 5) * (1 + i % 2)
    assert load(url) == (0, 0)


# ---------------------------------------------------------------- the shapes: several prompts, stop, streams, chat


def test_prompt_lists_stop_strings_and_echo(run, url):
    api = client(url)
    both = api.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=20, temperature=0, n=2)
    texts = [c.text for c in sorted(both.choices, key=lambda c: c.index)]
    assert texts[0] == texts[1] == ngpt_sample_greedy(run, "ROMEO:", 20)
    assert texts[2] == texts[3] == ngpt_sample_greedy(run, "JULIET:", 20)
    assert both.usage.prompt_tokens == 13 and both.usage.completion_tokens == 80
    stop = texts[0][5:7]  # a string that appears in the greedy text: it ends there
    cut = api.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == texts[0][:texts[0].index(stop)] and cut.choices[0].finish_reason == "stop"
    echoed = api.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "ROMEO:" + texts[0][:5]
    ids = api.completions.create(model="tiny", prompt=[CHARS.index(c) for c in "ROMEO:"], max_tokens=20,
                                 temperature=0)
    assert ids.choices[0].text == texts[0]


def test_streaming_gives_the_same_text_and_ends_in_done(run, url):
    api = client(url)
    whole = api.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, seed=7, top_p=0.9,
                                   extra_body={"top_k": 20})
    chunks = list(api.completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, seed=7, top_p=0.9, stream=True,
                                         extra_body={"top_k": 20}, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 30 and not chunks[-1].choices
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_chat_completions_through_the_transcript_template(url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert render_chat(messages) == "Be brief.\n\nUser: Hello\nAssistant: Hi.\nUser: Why?\nAssistant:"
    api = client(url)
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and reply.object == "chat.completion" and "\nUser:" not in (
        choice.message.content)
    assert reply.usage.prompt_tokens == len(render_chat(messages))
    stream = api.chat.completions.create(model="tiny", messages=messages, max_tokens=25, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert [m.id for m in api.models.list().data] == ["tiny"] and api.models.retrieve("tiny").id == "tiny"


# ---------------------------------------------------------------- bad input: 4xx with OpenAI's error body


@pytest.mark.parametrize(("body", "status", "words"), [
    (b'{"prompt": "ab", "max_tokens": ', 400, "not valid JSON"),
    (b'["ab"]', 400, "must be a JSON object"),
    (b'\xff\xfe', 400, "not valid JSON"),
    ({"max_tokens": 5}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "prompt must not be empty"),
    ({"prompt": 5}, 400, "prompt must be a string"),
    ({"prompt": [300]}, 400, "token ids must be in"),
    ({"prompt": "ab", "max_tokens": "5"}, 400, "max_tokens must be an integer"),
    ({"prompt": "ab", "max_tokens": 201}, 400, "max_tokens must be in [1, 200]"),
    ({"prompt": "ab", "temperature": -1}, 400, "temperature must be in [0, 2]"),
    ({"prompt": "ab", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "ab", "n": 5}, 400, "n must be in [1, 4]"),
    ({"prompt": "ab", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "ab", "stop": ["a", 3]}, 400, "stop must be a string or a list"),
    ({"prompt": "ab", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "ab", "presence_penalty": 1.0}, 400, "presence_penalty is not supported"),
    ({"prompt": "ab", "bogus": 1}, 400, "unrecognized request argument: bogus"),
    ({"prompt": "ab\u00e9"}, 400, "is not in this model's"),
    ({"prompt": "ab" * 600_000}, 413, "larger than"),
])
def test_bad_requests_answer_4xx_with_an_error_body(url, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] and "Traceback" not in response.text


def test_bad_chat_and_unknown_paths(url):
    for messages, words in (([], "non-empty list"), ([{"role": "tool", "content": "x"}], "role must be one of"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "list of text parts")):
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages})
        assert response.status_code == 400 and words in response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nowhere").status_code == 404
    assert httpx.get(f"{url}/v1/completions").json()["error"]["message"] == "Method Not Allowed"
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4")


def test_a_failed_step_answers_500_and_the_server_goes_on(url, monkeypatch):
    step = BatchDecoder.step

    def fail_once(decoder):
        monkeypatch.setattr(BatchDecoder, "step", step)
        raise RuntimeError("out of\nmemory")

    monkeypatch.setattr(BatchDecoder, "step", fail_once)
    failed = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 3})
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": "decoding failed: RuntimeError: out of memory", "type": "server_error",
                                      "param": None, "code": None}
    assert client(url).completions.create(model="tiny", prompt="ab", max_tokens=3).usage.completion_tokens == 3


# ---------------------------------------------------------------- the API key, the queue, disconnects


def test_api_key_is_required_everywhere_but_health(run, monkeypatch):
    monkeypatch.setenv("NGPT_API_KEY", "s3cret")
    with serving(run) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        for path in ("/v1/models", "/v1/models/tiny"):
            assert httpx.get(f"{base}{path}").status_code == 401
        wrong = httpx.post(f"{base}/v1/completions", json={"prompt": "ab"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, "nope").completions.create(model="tiny", prompt="ab", max_tokens=2)
        assert client(base, "s3cret").completions.create(model="tiny", prompt="ab", max_tokens=2).choices[0].text


def load(base: str) -> tuple[int, int]:
    health = httpx.get(f"{base}/health").json()
    return health["running"], health["waiting"]


def test_a_full_queue_answers_429_and_disconnected_clients_free_their_rows(run):
    with serving(run, "--max_batch=1", "--max_n=1", "--max_queue=1", "--max_tokens=100000") as base:
        long = {"prompt": "ab", "max_tokens": 100000, "stream": True}
        with httpx.Client(base_url=base, timeout=30) as first, httpx.Client(base_url=base, timeout=30) as second:
            with first.stream("POST", "/v1/completions", json=long) as running:
                lines = running.iter_lines()  # (one iterator: dropping it would close the stream)
                next(lines)  # decoding
                with second.stream("POST", "/v1/completions", json=long) as waiting:
                    assert waiting.status_code == 200 and load(base) == (1, 1)
                    full = httpx.post(f"{base}/v1/completions", json={"prompt": "ab"})
                    assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(httpx.ReadTimeout):  # a client waiting for a whole response gives up
            httpx.post(f"{base}/v1/completions", json={"prompt": "ab", "max_tokens": 100000}, timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and load(base) != (0, 0):
            time.sleep(0.05)
        assert load(base) == (0, 0)
        done = client(base).completions.create(model="tiny", prompt="ab", max_tokens=3, temperature=0)
        assert done.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- the command: options, signals


def test_bad_options_are_one_error_line_before_anything_loads(run):
    for option, words in (("--max_n=9", "cannot exceed --max_batch"), ("--port=70000", "--port must be in"),
                          ("--max_queue=0", "--max_queue must be positive"), ("--api_key=", "--api_key is empty"),
                          ("--bogus=1", "unknown option --bogus")):
        result = CliRunner().invoke(app, ["serve", f"--out_dir={run}", option])
        assert result.exit_code == 2 and words in result.stderr and result.stderr.startswith("error:"), option


def test_a_port_in_use_is_one_error_line(run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", f"--out_dir={run}", "--device=cpu", f"--port={port}"])
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_sigterm_ends_requests_in_flight_and_exits_0(run):
    process = subprocess.Popen([sys.executable, "-m", "nanogpt_cli", "serve", f"--out_dir={run}", "--port=0",
                                "--device=cpu", "--host=127.0.0.1", "--max_tokens=100000"],
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("http://"):
                break
        base = lines[-1].split()[0]
        with httpx.stream("POST", f"{base}/v1/completions", timeout=30,
                          json={"prompt": "ab", "max_tokens": 100000, "stream": True}) as stream:
            events = stream.iter_lines()
            next(events)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in events if line]
        assert "shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert process.wait(30) == 0
        assert "stopped by SIGTERM" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- the playground page, in a real browser

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by .ci/run


def test_the_playground_page_streams_a_completion_in_chromium(run, url):
    if not CHROMIUM.exists():
        missing(f"needs {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    sync_api = require_module("playwright.sync_api")
    expected = ngpt_sample_greedy(run, "JULIET:", 60)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            outside = []  # the page fetches nothing but its own server
            page.on("request", lambda request: None if request.url.startswith(url) else outside.append(request.url))
            page.goto(f"{url}/")
            sync_api.expect(page.locator("#model")).to_contain_text("tiny", timeout=20_000)
            page.fill("#prompt", "JULIET:")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "60")
            # one mutation record per streamed event the page appends (several arrive in one read on a busy machine)
            page.evaluate("""() => { window.updates = 0;
                new MutationObserver(records => window.updates += records.length)
                .observe(document.querySelector('#output .completion'), {childList: true, characterData: true,
                                                                          subtree: true}); }""")
            page.click("#generate")
            sync_api.expect(page.locator("#output .completion")).to_have_text(expected, timeout=20_000)
            sync_api.expect(page.locator("#status")).to_contain_text("60 tokens", timeout=20_000)
            assert "tokens/s" in page.text_content("#status")
            assert page.evaluate("window.updates") > 1  # the text arrived piece by piece
            assert page.text_content("#output .prompt") == "JULIET:" and not outside
        finally:
            browser.close()
