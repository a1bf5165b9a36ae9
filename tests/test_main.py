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


# The entry point with an atexit handler of the test's: it prints only if the interpreter tears itself down.
WITH_TEARDOWN_MARK = """
import atexit, sys
atexit.register(lambda: print("teardown", file=sys.stderr))
sys.argv = ["ngpt", *sys.argv[1:]]
from nanogpt_cli.__main__ import main
main()
"""


def ngpt_marked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITH_TEARDOWN_MARK, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from nanogpt_cli.config import TrainConfig, build
    from nanogpt_cli.train import train
    from tests.conftest import TINY, write_char_dataset

    root = tmp_path_factory.mktemp("quick-exit")
    write_char_dataset(root / "data")
    train(build(TrainConfig, None, [*TINY, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}"]))
    return root / "out"


def test_sample_ends_without_the_interpreters_teardown_and_keeps_its_output_and_exit_code(tiny_run):
    done = ngpt_marked("--quiet", "sample", f"--out_dir={tiny_run}", "--max_new_tokens=20", "--num_samples=3",
                       "--prompt=ab", "--json")
    assert done.returncode == 0 and "teardown" not in done.stderr, done.stderr
    samples = json.loads(done.stdout)  # the whole output, flushed before the end
    assert len(samples["samples"]) == 3
    refused = ngpt_marked("sample", f"--out_dir={tiny_run}", "--max_new_tokens=0")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "teardown" not in refused.stderr
    other = ngpt_marked("presets")  # any other command ends as Python does
    assert other.returncode == 0 and other.stderr.strip().endswith("teardown")
