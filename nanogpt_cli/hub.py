"""The Hugging Face Hub as ngpt meets it: whether it can be reached, its failures as one line, its logs kept quiet.

Shared by the model import (`hf`) and the dataset recipes (`prepare`); light to import (the Hub's
client is imported only inside functions), so the CLI can read the defaults below at start-up.
"""

from __future__ import annotations

import contextlib
import os

from nanogpt_cli.errors import NgptError, one_line

OPENWEBTEXT_ID = "Skylion007/openwebtext"
# datasets >= 4 runs no loading scripts, and openwebtext is a script dataset: read the Hub's parquet export
OPENWEBTEXT_REVISION = "refs/convert/parquet"

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
# What a failure to reach the Hub says about itself: its class (the standard library's, requests', httpx',
# huggingface_hub's offline mode) or its message (transformers and datasets rewrap the client's errors).
_UNREACHABLE_CLASSES = {"ConnectionError", "TimeoutError", "Timeout", "TimeoutException", "TransportError"}
_UNREACHABLE_WORDS = ("connect", "offline", "network", "resolve host", "timed out", "timeout", "couldn't reach")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host takes a TCP connection. Offline, the Hub client retries for ~25 s before it
    fails; with this answer an offline machine loads a cached model at once (local_files_only) and an
    uncached one fails at once. Behind a proxy the proxy decides, so the answer is yes without a probe."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def offline_unless_reachable(uses_hub: bool = True):
    """The Hub clients (huggingface_hub, datasets) in offline mode while the Hub's host cannot be reached: a
    cached dataset loads at once and an uncached one fails at once, without ~30 s of retries."""
    if not uses_hub or hub_reachable():
        yield
        return
    import huggingface_hub.constants

    modules = [huggingface_hub.constants]
    with contextlib.suppress(ImportError):
        import datasets.config

        modules.append(datasets.config)
    saved = [module.HF_HUB_OFFLINE for module in modules]
    for module in modules:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module.HF_HUB_OFFLINE = value


def unreachable(e: BaseException) -> bool:
    """Whether `e` says that the Hub could not be reached (no network, offline mode, a timeout),
    rather than that it answered no (an unknown name, a gated repository, a missing file)."""
    if _UNREACHABLE_CLASSES & {cls.__name__ for cls in type(e).__mro__}:
        return True
    text = one_line(e).lower()
    return any(word in text for word in _UNREACHABLE_WORDS)


def hub_error(name: str, e: BaseException, hint: str) -> NgptError:
    """The one line for a failure to load `name` from the Hub; `hint` says how to do without the Hub
    ("pass a local folder ...") and completes both "without network, ..." and "check the name, or ..."."""
    if unreachable(e):
        return NgptError(f"could not load {name!r}: the Hugging Face Hub could not be reached ({type(e).__name__}); "
                         f"without network, {hint}")
    return NgptError(f"could not load {name!r} from the Hugging Face Hub ({type(e).__name__}: {one_line(e, 300)}); "
                     f"check the name, or {hint}")


@contextlib.contextmanager
def quiet_hub_logs():
    """Keep huggingface_hub's and transformers' warnings out of ngpt's output (shown with --verbose):
    without a network the Hub client logs a line per failed request and per retry ("Retrying in 1s
    [Retry 1/5]"), a dozen lines before ngpt's one-line error; transformers logs a load report whose
    problems `hf` turns into one error itself."""
    import logging

    import huggingface_hub.utils.logging  # noqa: F401  importing it sets its logger's level: before ours

    from nanogpt_cli.progress import is_verbose

    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    if not is_verbose():
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
