"""The console script's start-up (nanogpt_cli/__main__.py): which commands import torch while the signals are held
back, and the garbage collector's part in it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run the entry point with the CLI itself replaced by a report of the state start-up left behind.
START_UP = """
import gc, json, signal, sys
from nanogpt_cli import cli
collections = []  # the collections that run from main's start on
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
cli.main = lambda: print(json.dumps({"torch": "torch" in sys.modules, "gc_enabled": gc.isenabled(),
                                     "frozen": gc.get_freeze_count(), "collections": len(collections),
                                     "sigint_blocked": signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])}))
sys.argv = ["ngpt", *sys.argv[1:]]
from nanogpt_cli.__main__ import main
main()
"""


def start_up(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", START_UP, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, imports_torch", [
    (["sample", "--out_dir=out"], True),
    (["--quiet", "sample", "--out_dir=out"], True),  # the command comes after the global flags
    (["-q", "--verbose", "bench", "--generate"], True),
    (["sample", "--help"], False),  # help stays quick
    (["plot", "out"], False),  # a command without torch
    ([], False),
])
def test_start_up_imports_torch_for_the_commands_that_need_it(args, imports_torch):
    state = start_up(*args)
    assert state["torch"] is imports_torch
    assert state["gc_enabled"] and not state["sigint_blocked"]  # both are back once start-up is over


def test_start_up_objects_are_frozen_out_of_the_collectors_work():
    """torch's import makes well over 100,000 long-lived objects: the collector is off while they are made, and they
    are frozen afterwards, so neither later collections nor the interpreter's exit walk them again."""
    state = start_up("sample", "--out_dir=out")
    assert state["frozen"] > 100_000 and state["collections"] == 0  # torch's import ran with the collector off
    assert start_up("plot", "out")["frozen"] > 1_000  # the CLI's own imports (typer, rich) are frozen too
