"""The Hub's failures as one line: could not be reached (without network, do X) or said no (check the name)."""

from __future__ import annotations

import pytest

from nanogpt_cli.hub import hub_error, unreachable

HINT = "pass a local folder instead"


class TransportError(Exception):
    """Named like httpx's base of connection errors, which are not OSErrors."""


class ConnectError(TransportError):
    pass


@pytest.mark.parametrize("e", [
    ConnectionError("[Errno 111] Connection refused"),
    TimeoutError(),
    ConnectError("All connection attempts failed"),
    OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
    ValueError("Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFoundError)"),
])
def test_an_unreachable_hub_says_so_and_how_to_do_without(e):
    assert unreachable(e)
    message = str(hub_error("nobody/nothing", e, HINT))
    assert message == (f"could not load 'nobody/nothing': the Hugging Face Hub could not be reached "
                       f"({type(e).__name__}); without network, {HINT}")


@pytest.mark.parametrize("e, reason", [
    (OSError("nobody/nothing is not a local folder and is not a valid model identifier\nlisted on the Hub"),
     "OSError: nobody/nothing is not a local folder and is not a valid model identifier listed on the Hub"),
    (FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub or cannot be accessed."),
     "FileNotFoundError: Dataset 'nobody/nothing' doesn't exist on the Hub or cannot be accessed."),
    (ValueError("BuilderConfig 'x' not found. Available: ['default']"),
     "ValueError: BuilderConfig 'x' not found. Available: ['default']"),
])
def test_a_hub_that_said_no_gives_its_reason_on_one_line(e, reason):
    assert not unreachable(e)
    message = str(hub_error("nobody/nothing", e, HINT))
    assert message == f"could not load 'nobody/nothing' from the Hugging Face Hub ({reason}); check the name, or {HINT}"
