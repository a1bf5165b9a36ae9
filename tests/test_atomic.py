"""Whole-or-nothing files: temporary siblings, their cleanup after killed writers, atomic downloads."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from nanogpt_cli.atomic import download, remove_stale_temps, temp_sibling
from nanogpt_cli.errors import NgptError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_killed_writers_go_files_and_folders_alike(tmp_path):
    target = tmp_path / "data[1]"  # glob characters in the name are matched literally
    mine = temp_sibling(target)
    assert re.fullmatch(rf"\.data\[1\]\.tmp-{os.getpid()}-[0-9a-f]{{8}}", mine.name) and mine.parent == tmp_path
    assert temp_sibling(target) != mine  # a fresh name each time: nobody can plant a link at it beforehand
    pid = dead_pid()
    stale_file, stale_folder = tmp_path / f".data[1].tmp-{pid}-0badf00d", tmp_path / f".data[1].tmp-{pid + 1_000_000}"
    stale_file.write_bytes(b"half")
    stale_folder.mkdir()
    (stale_folder / "train.bin").write_bytes(b"half")
    kept = [tmp_path / f".data[1].tmp-{os.getppid()}-12345678",  # a running process's write in progress
            mine,  # this process's own
            tmp_path / ".data[1].tmp-notapid", tmp_path / f".other.tmp-{pid}"]
    for path in kept:
        path.write_bytes(b"half")
    assert sorted(remove_stale_temps(target)) == sorted([stale_file, stale_folder])
    assert sorted(tmp_path.iterdir()) == sorted(kept)


class Response(io.BytesIO):
    """What urlopen returns, as far as a download reads it: a body and its headers."""

    def __init__(self, body: bytes = b"", headers: dict | None = None):
        super().__init__(body)
        self.headers = headers or {}


def test_download_is_atomic_and_says_what_to_do_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(b"text\n"))
    stale = tmp_path / "cache" / f".input.txt.tmp-{dead_pid()}"  # a download killed earlier
    stale.parent.mkdir()
    stale.write_bytes(b"te")
    download("https://example.org/input.txt", tmp_path / "cache" / "input.txt", "--source")
    assert os.listdir(tmp_path / "cache") == ["input.txt"]
    assert (tmp_path / "cache" / "input.txt").read_bytes() == b"text\n"

    class Broken(Response):
        def read1(self, *args):
            raise TimeoutError("The read operation timed out")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Broken())
    with pytest.raises(NgptError, match=r"^could not download https://example.org/b.txt \(example.org sent nothing for "
                                        r"60 s: The read operation timed out\); without network, download it elsewhere "
                                        r"and pass --source PATH$"):
        download("https://example.org/b.txt", tmp_path / "cache" / "b.txt", "--source")
    assert os.listdir(tmp_path / "cache") == ["input.txt"]  # no partial file

    def offline(url, timeout):
        raise urllib.error.URLError(OSError("[Errno -3] Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(NgptError, match=r"\(\[Errno -3\] Temporary failure in name resolution\)"):
        download("https://example.org/c.txt", tmp_path / "cache" / "c.txt", "--lambada-file")
