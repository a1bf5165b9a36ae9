"""Hostile inputs to prepare, export, downloads and bench traces: planted links, crafted meta.json files,
datasets and exports that must not be replaced, FIFOs and devices, symlink cycles, servers that cut short,
stall or trickle, signals mid-write, full disks, and the advice in each error line.

Each test names what it tries; each failed before these paths were hardened (a hang shows as a timeout)."""

from __future__ import annotations

import errno
import functools
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nanogpt_cli import atomic
from nanogpt_cli import prepare as P
from nanogpt_cli.atomic import atomic_file, exclusive_lock
from nanogpt_cli.bench import check_trace_path, profile_steps
from nanogpt_cli.cli import app
from nanogpt_cli.data import BatchLoader, load_meta
from nanogpt_cli.errors import NgptError, UsageError
from nanogpt_cli.prepare import writer
from tests.conftest import require_module

CPU = torch.device("cpu")
TEXT_A = "the first corpus, made in project A. " * 60
TEXT_B = "A second corpus from project B, with other letters: xyzqj! " * 45


def opts(tmp_path, **kwargs) -> P.PrepareOptions:
    return P.PrepareOptions(data_dir=tmp_path / "data", quiet=True, tokenizer="char", **kwargs)


def snapshot(folder: Path) -> dict:
    """Every entry of a folder, hidden ones included, with its bytes (a folder as None)."""
    return {p.name: None if p.is_dir() else p.read_bytes() for p in folder.iterdir()}


def prepared(tmp_path, text: str = TEXT_A, name: str = "ds", where: str = "projA") -> Path:
    source = tmp_path / where / "notes.txt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(text)
    P.prepare_text([str(source)], opts(tmp_path, name=name))
    return tmp_path / "data" / name


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def ngpt(tmp_path, monkeypatch):
    """`ngpt ARGS...` in this process, its data and cache folders in tmp_path."""
    monkeypatch.setenv("NGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def ngpt_process(tmp_path, *args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """`python -m nanogpt_cli ARGS...` as a real process, bounded in time (a hang fails, never blocks the suite)."""
    env = {**os.environ, "NGPT_DATA_DIR": str(tmp_path / "data"), "NGPT_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "nanogpt_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


# ---------------------------------------------------------------------------------------------
# 1. Files followed where they should not go.


def test_a_link_planted_at_the_temporary_name_is_never_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "ckpt.pt"
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: "guessed0")  # the attacker guessed the name
    planted = tmp_path / f".ckpt.pt.tmp-{os.getpid()}-guessed0"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError), atomic_file(target) as f:
        f.write(b"new")
    assert victim.read_bytes() == b"precious" and not target.exists() and planted.is_symlink()


def test_links_planted_at_every_name_prepare_writes_are_not_followed(tmp_path):
    folder = prepared(tmp_path)
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):  # the targets: replaced, not written through
        (victims / name).write_bytes(b"precious")
        (folder / name).unlink()
        (folder / name).symlink_to(victims / name)
    # the temporary folder's name as it used to be (predictable): a link there must not matter
    (tmp_path / "data" / f".ds.tmp-{os.getpid()}").symlink_to(victims)
    P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds", force=True))
    assert snapshot(victims) == dict.fromkeys(("train.bin", "val.bin", "meta.json"), b"precious")
    assert all((folder / name).is_file() and not (folder / name).is_symlink()
               for name in ("train.bin", "val.bin", "meta.json"))


def test_a_link_planted_at_the_lock_file_is_refused(tmp_path):
    folder = prepared(tmp_path)
    before = snapshot(folder)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(NgptError, match=r"cannot create the lock file .*\.lock"):
        P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds", force=True))
    assert victim.read_bytes() == b"precious"
    (folder / ".lock").unlink()
    assert snapshot(folder) == before


def test_links_planted_at_the_download_names_are_not_followed(tmp_path, monkeypatch):
    victim, partial_victim = tmp_path / "victim.txt", tmp_path / "partial-victim.txt"
    partial_victim.write_bytes(b"precious")
    target = tmp_path / "cache" / "input.txt"
    target.parent.mkdir()
    target.symlink_to(victim)  # dangling: the cache looks empty, so the download runs
    (target.parent / f".input.txt.tmp-{os.getpid()}").symlink_to(partial_victim)  # the old partial file's name
    with serve(monkeypatch, "full") as url:
        atomic.download(url, target, "--source")
    assert not victim.exists() and not target.is_symlink() and target.read_bytes() == BODY
    assert partial_victim.read_bytes() == b"precious"


def _crafted(tmp_path, name: str) -> Path:
    folder = prepared(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["train"]["file"] = name
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("name", ["/etc/hostname", "../other/train.bin", "sub/train.bin", "..", "", 7])
def test_a_crafted_meta_json_cannot_name_a_file_outside_its_folder(tmp_path, name):
    folder = _crafted(tmp_path, name)
    for where in (tmp_path / "data" / "other", folder / "sub"):  # files the crafted names would reach
        where.mkdir()
        (where / "train.bin").write_bytes(b"\0" * 4096)
    with pytest.raises(NgptError, match=r"meta\.json \(train\): .* is not a file name inside"):
        BatchLoader(folder, load_meta(folder), 2, 8, CPU)
    assert P.dataset_info("ds", tmp_path / "data")["complete"] is False


@pytest.mark.parametrize("kind", ["symlink out", "fifo"])
def test_a_split_file_must_be_a_regular_file(tmp_path, kind):
    folder = _crafted(tmp_path, "odd.bin")
    if kind == "fifo":
        os.mkfifo(folder / "odd.bin")
    else:
        (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
        (folder / "odd.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(NgptError, match=r"odd\.bin is a (symlink|FIFO).*, not a regular file inside"):
        BatchLoader(folder, load_meta(folder), 2, 8, CPU)


def test_the_trace_never_overwrites_a_file_it_did_not_write(tmp_path, ngpt):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"PK\3\4 a checkpoint")
    line = one_error_line(ngpt("bench", "--device=cpu", "--profile", "--trace", ckpt), 2)
    assert "is not a trace that --profile wrote" in line and "add --force" in line
    assert ckpt.read_bytes() == b"PK\3\4 a checkpoint"
    with pytest.raises(UsageError, match="is a folder"):
        check_trace_path(tmp_path, replace_any=True)
    # with --force, a link at the trace path is replaced, never written through
    trace = tmp_path / "trace.json"
    trace.symlink_to(ckpt)
    check_trace_path(trace, replace_any=True)
    profile_steps(lambda: torch.ones(4) + 1, CPU, trace, 1, 3)
    assert ckpt.read_bytes() == b"PK\3\4 a checkpoint" and not trace.is_symlink()
    assert "traceEvents" in json.loads(trace.read_text())
    check_trace_path(trace, replace_any=False)  # a previous trace may be replaced without --force


# ---------------------------------------------------------------------------------------------
# 2. Work silently replaced.


def test_a_dataset_from_another_source_is_not_replaced_without_being_told(tmp_path, ngpt):
    folder = prepared(tmp_path, name="notes")
    before = snapshot(folder)
    other = tmp_path / "projB" / "notes.txt"
    other.parent.mkdir()
    other.write_text(TEXT_B)
    line = one_error_line(ngpt("prepare", "text", other, "--tokenizer", "char"), 2)
    assert "projA/notes.txt" in line and "projB/notes.txt" in line and "--force" in line and "--name" in line
    assert snapshot(folder) == before
    assert ngpt("prepare", "text", other, "--tokenizer", "char", "--name", "notes_b").exit_code == 0
    assert snapshot(folder) == before
    assert ngpt("prepare", "text", other, "--tokenizer", "char", "--force").exit_code == 0
    assert json.loads((folder / "meta.json").read_text())["source"] == str(other)


def test_a_folder_that_is_no_dataset_and_an_unreadable_meta_are_not_replaced(tmp_path, ngpt):
    source = tmp_path / "notes.txt"
    source.write_text(TEXT_A)
    mine = tmp_path / "data" / "mine"
    mine.mkdir(parents=True)
    (mine / "train.bin").write_bytes(b"my own tokens")
    line = one_error_line(ngpt("prepare", "text", source, "--tokenizer", "char", "--name", "mine"), 2)
    assert "holds files (train.bin) but no dataset" in line
    assert (mine / "train.bin").read_bytes() == b"my own tokens"
    folder = prepared(tmp_path, name="broken")
    (folder / "meta.json").write_text("{not json")
    before = snapshot(folder)
    line = one_error_line(ngpt("prepare", "text", source, "--tokenizer", "char", "--name", "broken"), 2)
    assert "is unreadable" in line and "--force" in line
    assert snapshot(folder) == before


def test_the_old_meta_json_stays_until_the_new_files_are_in(tmp_path, monkeypatch):
    folder = prepared(tmp_path)
    seen, real = [], os.replace

    def replace(src, dst):
        seen.append((Path(dst).name, (folder / "meta.json").exists()))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "projA" / "notes.txt").write_text(TEXT_B)
    P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds"))
    assert seen == [("train.bin", True), ("val.bin", True), ("meta.json", True)]


def test_a_signal_during_the_commit_waits_for_the_whole_new_dataset(tmp_path, monkeypatch, request):
    folder = prepared(tmp_path)
    # Python's Ctrl-C handler, also under a runner started in the background (which inherits SIGINT ignored)
    request.addfinalizer(functools.partial(signal.signal, signal.SIGINT,
                                           signal.signal(signal.SIGINT, signal.default_int_handler)))
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "train.bin":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between the renames
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "projA" / "notes.txt").write_text(TEXT_B)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds"))
    meta = json.loads((folder / "meta.json").read_text())
    assert writer._is_complete(folder, meta) and set(meta["itos"]) == set(TEXT_B)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_second_writer_is_refused_naming_the_first_ones_pid(tmp_path):
    folder = prepared(tmp_path)
    before = snapshot(folder)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from nanogpt_cli.atomic import "
         "exclusive_lock\nwith exclusive_lock(Path(sys.argv[1]), 'x', 'y'):\n print('locked', flush=True)\n "
         "time.sleep(60)", str(folder / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"^dataset 'ds' is being written by another process "
                                             rf"\(pid {holder.pid}\); wait for it to finish, or prepare under "
                                             rf"another --name$"):
            P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds", force=True))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert {k: v for k, v in snapshot(folder).items() if k != ".lock"} == before
    P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds", force=True))  # a dead holder
    assert ".lock" not in snapshot(folder)


def test_a_lock_is_exclusive_within_a_process_too(tmp_path):
    with exclusive_lock(tmp_path / ".lock", "dataset 'ds'", "wait"), \
            pytest.raises(UsageError, match=rf"being written by another process \(pid {os.getpid()}\)"):
        with exclusive_lock(tmp_path / ".lock", "dataset 'ds'", "wait"):
            pass
    assert not (tmp_path / ".lock").exists()


def test_a_running_loader_keeps_reading_the_data_it_started_with(tmp_path):
    folder = prepared(tmp_path)
    copy = shutil.copytree(folder, tmp_path / "copy")
    loader = BatchLoader(folder, load_meta(folder), 3, 8, CPU, seed=4)
    reference = BatchLoader(copy, load_meta(copy), 3, 8, CPU, seed=4)
    (tmp_path / "projA" / "notes.txt").write_text(TEXT_B * 3)  # re-prepared: longer, other characters
    P.prepare_text([str(tmp_path / "projA" / "notes.txt")], opts(tmp_path, name="ds"))
    assert load_meta(folder)["vocab_size"] != load_meta(copy)["vocab_size"]
    for split in ("train", "val", "train"):
        x, y = loader.get_batch(split)
        rx, ry = reference.get_batch(split)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_a_loader_refuses_split_files_that_do_not_match_meta_json(tmp_path):
    folder = prepared(tmp_path)
    with open(folder / "train.bin", "ab") as f:  # new bins renamed in, the old meta.json still there
        f.write(np.zeros(100, dtype=np.uint16).tobytes())
    with pytest.raises(NgptError, match=r"train\.bin holds \d+ tokens where meta\.json says \d+; prepare the"):
        BatchLoader(folder, load_meta(folder), 2, 8, CPU)


def _model():
    from nanogpt_cli.model import GPT, GPTConfig

    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))


META = {"tokenizer": None, "vocab_size": 16}


def test_a_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    require_module("transformers")
    from nanogpt_cli import hf

    def full_disk(path, *args):  # the last file of the export: half of it written, then the disk is full
        Path(path).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "new_file", full_disk)
    with pytest.raises(NgptError, match=r"^could not write the export .*/hf: No space left on device; nothing was"):
        hf.export_hf(_model(), tmp_path / "hf", META)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # a previous export, kept whole on failure
    with pytest.raises(NgptError):
        hf.export_hf(_model(), tmp_path / "hf", META, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and snapshot(tmp_path / "hf") == {"config.json": b"{}"}


def test_export_force_replaces_the_whole_previous_export_and_only_an_export(tmp_path, ngpt):
    require_module("transformers")
    from nanogpt_cli import hf

    source = hf.export_hf(_model(), tmp_path / "src", META)
    dest = tmp_path / "dest"
    shutil.copytree(source, dest)
    (dest / "tokenizer.json").write_text("{}")  # a BPE export's tokenizer, wrong for this model
    line = one_error_line(ngpt("export", source, dest), 2)
    assert "add --force" in line
    assert ngpt("export", source, dest, "--force").exit_code == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in source.iterdir())
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"weights")
    line = one_error_line(ngpt("export", source, run, "--force"), 2)
    assert "not a Hugging Face export (ckpt.pt)" in line and "add --force" not in line
    assert snapshot(run) == {"ckpt.pt": b"weights"}
    (tmp_path / "link").symlink_to(run)
    line = one_error_line(ngpt("export", source, tmp_path / "link", "--force"), 2)
    assert "is not a folder" in line and "--force" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "link", "run", "src"]  # no temporary folders


# ---------------------------------------------------------------------------------------------
# 3. Commands that never come back.


def _socket_at(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


@pytest.mark.parametrize("kind, word", [("fifo", "a FIFO"), ("dev-zero", "a character device"),
                                        ("socket", "a socket")])
def test_inputs_that_are_not_regular_files_are_refused_at_once(tmp_path, kind, word):
    path = tmp_path / "notes.txt"
    {"fifo": lambda: os.mkfifo(path), "dev-zero": lambda: path.symlink_to("/dev/zero"),
     "socket": lambda: _socket_at(path)}[kind]()
    result = ngpt_process(tmp_path, "prepare", "text", path, "--tokenizer", "char", timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {path} is {word}{' (named pipe)' if kind == 'fifo' else ''}, " \
                                    "not a regular file"
    result = ngpt_process(tmp_path, "prepare", "shakespeare-char", "--source", path, timeout=30)
    assert result.returncode == 2 and "not a regular file" in result.stderr


def test_a_fifo_as_meta_json_does_not_hang_data_list_or_info(tmp_path):
    folder = prepared(tmp_path)
    (folder / "meta.json").unlink()
    os.mkfifo(folder / "meta.json")
    info = ngpt_process(tmp_path, "data", "info", "ds", timeout=30)
    assert info.returncode == 1 and "meta.json: unreadable" in info.stderr and "a FIFO" in info.stderr
    listing = ngpt_process(tmp_path, "data", "list", "--json", timeout=30)
    assert listing.returncode == 0 and json.loads(listing.stdout)[0]["error"] == "unreadable meta.json"


def test_benchmark_files_that_are_not_regular_files_are_refused(tmp_path):
    from nanogpt_cli import zeroshot

    (tmp_path / "lambada.jsonl").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "hellaswag.jsonl")
    for task in ("lambada", "hellaswag"):
        with pytest.raises(UsageError, match=rf"^--{task}-file .*{task}\.jsonl is a (character device|FIFO)"):
            zeroshot.benchmark_file(task, tmp_path / f"{task}.jsonl")


def test_globs_and_folder_walks_end_on_symlink_cycles_and_skip_fifos(tmp_path):
    tree = tmp_path / "tree" / "a"
    tree.mkdir(parents=True)
    (tree / "x.txt").write_text(TEXT_A)
    (tree / "up").symlink_to("..")
    (tree / "top").symlink_to("../..")
    os.mkfifo(tree / "pipe.txt")
    for arg, name in ((f"{tmp_path}/tree/**/*.txt", "globbed"), (tmp_path / "tree", "walked")):
        result = ngpt_process(tmp_path, "prepare", "text", arg, "--tokenizer", "char", "--name", name, "-q",
                              timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / "data" / name / "meta.json").read_text())["documents"] == 1


BODY = b"To be, or not to be, that is the question. " * 25


class Handler(http.server.BaseHTTPRequestHandler):
    """/full sends the body; /short promises more than it sends; /silent sends headers, then nothing;
    /trickle sends a byte every 50 ms."""

    def do_GET(self):
        try:
            self.respond()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def respond(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        mode = self.path.strip("/")
        if mode == "full":
            self.wfile.write(BODY)
        elif mode == "short":
            self.wfile.write(BODY[:500])
        elif mode == "silent":
            time.sleep(5)
        elif mode == "trickle":
            for i in range(len(BODY)):
                self.wfile.write(BODY[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)

    def log_message(self, *args):
        pass


class serve:
    """A local server for one mode, with the download limits made short (1 s, 200 bytes)."""

    def __init__(self, monkeypatch, mode: str):
        monkeypatch.setattr(atomic, "DOWNLOAD_TIMEOUT_S", 1)
        monkeypatch.setattr(atomic, "STALL_BYTES", 200)
        self.mode = mode

    def __enter__(self) -> str:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False  # a stalled handler is left behind
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/{self.mode}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode, message", [
    ("short", rf"127\.0\.0\.1 sent 500 of {len(BODY)} bytes \(cut short\); try again, or without network"),
    ("silent", r"\(127\.0\.0\.1 sent nothing for 1 s: .*timed out\); without network"),
    ("trickle", r"127\.0\.0\.1 sent \d+ bytes in 1 s \(stalled\)"),
])
def test_downloads_that_are_cut_short_or_stall_fail_soon_and_cache_nothing(tmp_path, monkeypatch, mode, message):
    monkeypatch.setenv("NGPT_CACHE_DIR", str(tmp_path / "cache"))
    with serve(monkeypatch, mode) as url:
        started = time.monotonic()
        with pytest.raises(NgptError, match=message):
            P.prepare_shakespeare_char(opts(tmp_path), source=url)
        assert time.monotonic() - started < 10
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []  # nothing cached, nothing half-written
    assert not (tmp_path / "data").exists()
    with serve(monkeypatch, "full") as url:
        assert P.prepare_shakespeare_char(opts(tmp_path), source=url)["status"] == "prepared"


SLOW_PREPARE = """
import sys, time
from nanogpt_cli.prepare import writer
real = writer._make_encoder
def slow(tokenizer, dtype):
    encode = real(tokenizer, dtype)
    def wrapped(text):
        time.sleep(0.05)
        return encode(text)
    return wrapped
writer._make_encoder = slow
writer.PIECE_CHARS = writer.UNIT_CHARS = 200
from nanogpt_cli.cli import app
app(sys.argv[1:], prog_name="ngpt")
"""


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_prepare_leaves_the_old_dataset_byte_for_byte(tmp_path, sig, code):
    folder = prepared(tmp_path)
    before = snapshot(folder)
    (tmp_path / "projA" / "notes.txt").write_text(TEXT_B * 20)
    env = {**os.environ, "NGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, "prepare", "text", tmp_path / "projA" / "notes.txt",
                             "--name", "ds", "--tokenizer", "char", "--num-proc", "1", "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(p.name.startswith(".build.tmp-") and (p / "train.bin").exists() for p in
                              folder.iterdir()))
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert snapshot(folder) == before  # no temporary folder, no lock file, the old files as they were
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ds"]


SLOW_EXPORT = """
import sys, time
import transformers
real = transformers.GPT2LMHeadModel.save_pretrained
def save_pretrained(self, *args, **kwargs):
    real(self, *args, **kwargs)
    print("saved", flush=True)
    time.sleep(60)
transformers.GPT2LMHeadModel.save_pretrained = save_pretrained
from nanogpt_cli.cli import app
app(sys.argv[1:], prog_name="ngpt")
"""


def test_sigterm_during_export_leaves_nothing_half_written(tmp_path):
    require_module("transformers")
    from nanogpt_cli import hf

    source = hf.export_hf(_model(), tmp_path / "src", META)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "export", source, tmp_path / "dest"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["error: stopped by SIGTERM; nothing was left half-written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------------------------
# 4. Errors: one line, the right exit code, the right advice.


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # writes past 64 KiB fail: a full disk


def test_a_full_disk_is_exit_1_naming_the_dataset_and_changes_nothing(tmp_path):
    folder = prepared(tmp_path)
    before = snapshot(folder)
    (tmp_path / "projA" / "notes.txt").write_text(TEXT_B * 100)  # half a megabyte of tokens
    result = ngpt_process(tmp_path, "prepare", "text", tmp_path / "projA" / "notes.txt", "--name", "ds",
                          "--tokenizer", "char", "-q", preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == f"error: could not prepare the dataset {folder}: File too large; nothing was " \
                                    "changed"
    assert snapshot(folder) == before


def test_a_download_that_cannot_be_saved_names_the_file_not_the_network(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "input.txt").mkdir()  # the cache file's place is taken
    with serve(monkeypatch, "full") as url, pytest.raises(NgptError) as caught:
        atomic.download(url, tmp_path / "cache" / "input.txt", "--source")
    assert str(caught.value).startswith(f"could not write {tmp_path / 'cache' / 'input.txt'}: ")
    assert "network" not in str(caught.value)


@pytest.mark.parametrize("args, code, expected", [  # the user's input: exit 2 (these were 1)
    (["prepare", "text", "{tmp}/empty.txt", "--force", "--tokenizer", "char"], 2, "empty corpus"),
    (["prepare", "text", "{tmp}/bad.jsonl", "--force", "--tokenizer", "char"], 2, "bad JSON"),
    (["prepare", "text", "{tmp}/nofield.jsonl", "--force", "--tokenizer", "char"], 2, "no 'text' field"),
    (["prepare", "text", "{tmp}/latin1.txt", "--force", "--tokenizer", "char"], 2, "invalid UTF-8"),
    # advice that --force was given cannot repeat (these said "add --force", or failed after the run)
    (["export", "{tmp}/nowhere", "{tmp}/afile", "--force"], 2, "is not a folder"),
    (["bench", "--device=cpu", "--profile", "--trace", "{tmp}", "--force"], 2, "is a folder"),
])
def test_errors_are_one_line_with_the_right_code_and_advice(tmp_path, ngpt, args, code, expected):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": 1\n')
    (tmp_path / "nofield.jsonl").write_text('{"title": "no text"}\n')
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "afile").write_text("x")
    line = one_error_line(ngpt(*(a.replace("{tmp}", str(tmp_path)) for a in args)), code)
    assert expected in line
    assert "add --force" not in line and "pass --force" not in line  # --force was given: it cannot be the advice
