"""OpenAI's request and response shapes for `ngpt serve`: bodies checked field by field, the chat transcript
template, and the JSON of completions, chat completions and their stream chunks.

A bad body is an `ApiError`, answered with OpenAI's `{"error": {...}}` body: 400 for malformed JSON, a
wrong type or an out-of-range value, naming the field. Fields this server does not implement are accepted
only at their neutral value (`presence_penalty: 0`, `logprobs: null`, ...); unknown fields are refused, as
OpenAI refuses them.

Chat messages become one prompt through a plain transcript (GPT-2 has no chat format of its own):

    {system or developer message}        <- each one, followed by a blank line
    User: {user message}
    Assistant: {assistant message}
    ...
    Assistant:

The model continues after the last "Assistant:"; its reply ends at "\\nUser:" (added to the request's stop
strings), at <|endoftext|>, at a stop string or at max_tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


class ApiError(Exception):
    """An HTTP error with OpenAI's body: status, message, the field at fault, OpenAI's error type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Limits:
    """The server's caps on a request (`ngpt serve --max_tokens ... --max_n ...`)."""

    max_tokens: int
    max_n: int
    vocab_size: int  # token ids in a prompt must be below it


@dataclass
class Sampling:
    """What a completion or chat request asks the decoder for."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # text, or token ids
    sampling: Sampling
    echo: bool = False


@dataclass
class ChatRequest:
    prompt: str  # the transcript
    sampling: Sampling


SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_k", "top_p", "n", "stop", "seed", "stream",
                   "stream_options", "user"}
# accepted only at these values: what OpenAI does when they are left out
NEUTRAL = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logprobs": (None, False),
           "top_logprobs": (None, 0), "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""),
           "response_format": (None, {"type": "text"})}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
STOP_LIMIT = 4  # OpenAI's limit on stop strings
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed:
            continue
        if name not in NEUTRAL:
            raise bad(f"unrecognized request argument: {name}", name)
        if value not in NEUTRAL[name]:
            raise bad(f"{name} is not supported by this server (only {_show(NEUTRAL[name][-1])})", name)


def _number(body: dict, name: str, default, low, high, integer: bool = False, low_open: bool = False):
    """A number field (null means the default) within [low, high] ((low, high] with low_open)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}, got {_show(value)}", name)
    if not (low < value if low_open else low <= value) or not value <= high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad(f"{name} must be in {interval}, got {_show(value)}", name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {_show(value)}", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or a list of strings, got {_show(value)}", "stop")
    if len(stops) > STOP_LIMIT:
        raise bad(f"stop takes at most {STOP_LIMIT} strings, got {len(stops)}", "stop")
    if "" in stops:
        raise bad("stop strings must not be empty", "stop")
    return stops


def parse_sampling(body: dict, limits: Limits, max_tokens_field: str = "max_tokens",
                   default_max_tokens: int | None = None) -> Sampling:
    """The sampling fields of a completion or chat body, checked against the server's limits."""
    if "model" in body and not isinstance(body["model"], str):
        raise bad(f"model must be a string, got {_show(body['model'])}", "model")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad(f"stream_options must be {{\"include_usage\": true|false}}, got {_show(options)}", "stream_options")
    top_k = _number(body, "top_k", 0, 0, 2**31 - 1, integer=True)
    top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    return Sampling(
        max_tokens=_number(body, max_tokens_field, default_max_tokens or limits.max_tokens, 1, limits.max_tokens,
                           integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_k=top_k or None,
        top_p=top_p if top_p < 1 else None,
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        stop=_stop(body),
        seed=_number(body, "seed", None, *SEED_RANGE, integer=True),
        stream=_bool(body, "stream"),
        include_usage=_bool(options or {}, "include_usage"),
    )


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_completion(body: dict, limits: Limits) -> CompletionRequest:
    _check_fields(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise bad("prompt is required", "prompt")
    prompt = body["prompt"]
    message = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"

    def token_ids(ids) -> list[int]:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad(message, "prompt")
        if not all(0 <= t < limits.vocab_size for t in ids):
            raise bad(f"token ids must be in [0, {limits.vocab_size - 1}] for this model", "prompt")
        return ids

    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [token_ids(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [token_ids(p) for p in prompt]
    else:
        raise bad(message, "prompt")
    if "" in prompts:
        raise bad("prompt must not be empty", "prompt")
    default = min(COMPLETIONS_DEFAULT_MAX_TOKENS, limits.max_tokens)
    return CompletionRequest(prompts, parse_sampling(body, limits, default_max_tokens=default), _bool(body, "echo"))


CHAT_ROLES = {"system": None, "developer": None, "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # where the model would start writing the user's next turn


def _message_text(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{index}].content must be a string or a list of text parts", f"messages[{index}].content")


def render_chat(messages) -> str:
    """The transcript prompt of a chat (see the module's docstring)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", f"messages[{i}].role")
        text = _message_text(message, i)
        speaker = CHAT_ROLES[message["role"]]
        parts.append(f"{text}\n\n" if speaker is None else f"{speaker}: {text}\n")
    return "".join(parts) + "Assistant:"


def parse_chat(body: dict, limits: Limits) -> ChatRequest:
    _check_fields(body, CHAT_FIELDS)
    if "messages" not in body:
        raise bad("messages is required", "messages")
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = parse_sampling(body, limits, field_name)
    sampling.stop = [*sampling.stop, CHAT_STOP]
    return ChatRequest(render_chat(body["messages"]), sampling)


# ---------------------------------------------------------------- responses

FINISH_REASONS = {"eot": "stop", "stop": "stop", "length": "length"}  # the decoder's reasons in OpenAI's words


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Response:
    """The id, time and model shared by a response and all its stream chunks; `chat` picks the object names."""

    def __init__(self, model: str, chat: bool):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def complete(self, texts: list[str], reasons: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
        """The whole response: one choice per text."""
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **content, "logprobs": None, "finish_reason": FINISH_REASONS[reason]})
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def chunk(self, index: int, text: str | None = None, reason: str | None = None, role: bool = False) -> dict:
        """A stream chunk of one choice: its new text, or its end (reason), or (chat) the opening role."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice["logprobs"] = None
        choice["finish_reason"] = FINISH_REASONS[reason] if reason else None
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
